"""cpl_mini.cli and ``python -m cpl_mini.train``: the options generated from TrainConfig, their help, the
boolean convention, bad values, the end-to-end run and its certification."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from cpl_mini.cli import build_parser, parse_train_args
from cpl_mini.runs import TrainConfig
from cpl_mini.train import main


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
