"""cpl_mini.cli and ``python -m cpl_mini.train``: the options generated from TrainConfig, their help, the
boolean convention, bad values, the end-to-end run and its certification."""

import dataclasses
import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from cpl_mini.cli import build_parser, parse_train_args
from cpl_mini.runs import TrainConfig
from cpl_mini.train import main

# ``cpl_mini.train`` is also the name of the function in the package's flat API: take the module itself.
train_mod = importlib.import_module("cpl_mini.train")
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ddp_worker import synthetic  # noqa: E402


def test_every_config_field_is_an_option_with_help_and_its_default():
    parser = build_parser()
    text = parser.format_help()
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in text, field.name
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and "(default: " in action.help, action.option_strings
    for markup in ("``", ":func:", ":class:", ":mod:", ":data:", "::", "--resume"):
        assert markup not in text, markup
    size = next(a for a in parser._actions if a.dest == "size")
    assert "XS, CPU, S, M, L, XL" in size.help


def test_one_convention_for_booleans_and_auto_on_off_settings():
    text = build_parser().format_help()
    for flag in ("augment", "std-normalize", "progress"):
        assert f"--{flag}, --no-{flag}" in text, flag
    cfg, progress = parse_train_args(
        [
            "--no-augment",
            "--std-normalize",
            "--compile",
            "true",
            "--channels-last",
            "off",
            "--size",
            "xs",
            "--no-progress",
        ]
    )
    assert (cfg.augment, cfg.std_normalize, cfg.compile, cfg.channels_last, cfg.size, progress) == (
        False,
        True,
        "on",
        "off",
        "XS",
        False,
    )
    cfg, progress = parse_train_args([])
    assert cfg == TrainConfig() and progress is True and cfg.compile == "auto"
    assert parse_train_args(["--compile"])[0].compile == "on"  # the bare flag of earlier versions


@pytest.mark.parametrize(
    "argv",
    [
        ["--epochs", "0"],
        ["--epochs", "-3"],
        ["--batch-size", "0"],
        ["--compile", "sometimes"],
        ["--size", "XXL"],
    ],
)
def test_bad_values_exit_2_with_one_line_and_no_folder(argv, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", str(out), "--device", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m cpl_mini.train: error:") and "Traceback" not in "".join(err)
    assert not out.exists()


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("XS", "XS"),
        ("xs", "XS"),
        ("20,7,45,2048", "20,7,45,2048"),
        ("(20, 7, 45, 2048)", "20,7,45,2048"),
        ("20x7x45x2048", "20,7,45,2048"),
    ],
)
def test_size_takes_a_name_or_the_four_numbers_the_docs_promise(text, canonical):
    assert parse_train_args(["--size", text])[0].size == canonical


@pytest.mark.parametrize("text", ["20,7,45", "20;7;45;2048", "(20,7,45,2048", "XXL", "1,1,0,8"])
def test_a_bad_size_spelling_is_one_line_listing_the_accepted_forms(text, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--size", text, "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m cpl_mini.train: error: unknown size")
    assert "XS, CPU, S, M, L, XL" in last and "20,7,45,2048 or (20, 7, 45, 2048) or 20x7x45x2048" in last
    assert not (tmp_path / "run").exists()


def test_model_imports_the_factory_the_command_line_names(tmp_path, monkeypatch):
    (tmp_path / "cli_nets.py").write_text(
        "import torch.nn as nn\n"
        "def make_net(config):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3072, config.num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = {}

    def fake_train(config, progress=True, model=None, **kwargs):
        seen.update(config=config, model=model)
        return {"status": "finished"}

    monkeypatch.setattr(train_mod, "train", fake_train)
    assert main(["--model", "cli_nets:make_net", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert seen["config"].model == "cli_nets:make_net"
    assert seen["model"] is sys.modules["cli_nets"].make_net
    assert main(["--out", str(tmp_path / "run")]) == 0 and seen["model"] is None  # the CPL network


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_nets_module:make_net", "no module 'no_such_nets_module'"),
        ("json:make_net", "has no 'make_net'"),
    ],
)
def test_a_model_that_cannot_be_imported_is_a_one_line_error(spec, message, tmp_path, capsys):
    assert main(["--model", spec, "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --model") and message in err[0]
    assert not (tmp_path / "run").exists()


def test_too_few_training_images_says_which_flags_to_change(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("cpl_mini.cifar.load_cifar", lambda *a, **k: synthetic(n_train=128, n_test=16))
    out = tmp_path / "run"
    assert main(["--size", "XS", "--limit-train", "100", "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --limit-train 100 leaves 100 training images")
    assert "use --limit-train 256 or more, or a smaller --batch-size" in err[0] and "drop_last" not in err[0]
    flags = {a for action in build_parser()._actions for a in action.option_strings}
    assert {"--limit-train", "--batch-size"} <= flags
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_build_is_a_one_line_error(tmp_path, capsys):
    assert main(["--device", "cuda", "--size", "XS", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "CUDA" in err[0]
    assert not (tmp_path / "run").exists()


def test_cli_end_to_end(cifar_root, tmp_path):
    env = {**os.environ, "CPL_MINI_DATA": str(cifar_root), "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "cli"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cpl_mini.train",
            "--size",
            "XS",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--limit-train",
            "256",
            "--limit-test",
            "100",
            "--out",
            str(out),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "epoch 1/1" in run.stdout and (out / "results.json").exists()
    assert "torch.compile: off" in run.stdout
    cert = subprocess.run(
        [sys.executable, "-m", "cpl_mini.certify", str(out), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cert.returncode == 0, cert.stderr[-2000:]
    table = json.loads(cert.stdout.strip().splitlines()[-1])
    assert table["n"] == 100 and set(table["certified"]) == {"36/255", "72/255", "108/255"}
    saved = json.loads((out / "results.json").read_text())["final"]
    assert table["accuracy"] == pytest.approx(saved["clean_acc"])
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "cpl_mini.train",
            "--size",
            "XS",
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and "epochs" in bad.stderr
