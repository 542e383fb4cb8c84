"""cpl_mini.train: the recipe, real CIFAR-10 learning, exact resume, NaN stop on every process, DDP, the
set-up (device, autocast dtype), the compile rule, finished and interrupted runs, bad input."""

import builtins
import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from cpl_mini.bounds import lipschitz_upper_bound
from cpl_mini.cifar import load_cifar
from cpl_mini.layers import (
    ChannelPad,
    ConvexPotentialConv2d,
    ConvexPotentialLinear,
    FirstCoordinates,
    LipschitzAvgPool2d,
)
from cpl_mini.runs import CheckpointError, TrainConfig, load_checkpoint
from cpl_mini.train import autocast_dtype, compile_decision, cpu_info, device_name, lr_at, margin_loss, train

# ``cpl_mini.train`` is also the name of the function in the package's flat API: take the module itself.
train_mod = importlib.import_module("cpl_mini.train")

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ddp_worker import synthetic  # noqa: E402


def quiet(*args):
    pass


def test_schedule_is_the_papers_piecewise_linear_one():
    T, lr = 1000, 1e-3
    assert lr_at(0, T, lr) == pytest.approx(lr * 0.5 / 400)
    assert lr_at(399.5, T, lr) == pytest.approx(lr)
    assert lr_at(799.5, T, lr) == pytest.approx(lr / 20)
    assert lr_at(T - 1, T, lr) == pytest.approx(lr / 20 * 0.5 / 200)
    assert all(lr_at(s, T, lr) > 0 for s in range(T))  # no wasted step at either end


def test_margin_loss_matches_its_formula():
    logits = torch.randn(7, 5)
    y = torch.randint(0, 5, (7,))
    manual = torch.stack(
        [
            sum(torch.clamp(0.7 - logits[i, y[i]] + logits[i, j], min=0) for j in range(5) if j != y[i]) / 5
            for i in range(7)
        ]
    ).mean()
    assert margin_loss(logits, y, 0.7).item() == pytest.approx(manual.item(), rel=1e-6)


@pytest.fixture(scope="module")
def cifar_small(cifar_root):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_cifar("cifar10", root=cifar_root, download=False)
    return data


def test_tiny_model_learns_real_cifar10(cifar_small, tmp_path):
    cfg = TrainConfig(
        size="XS",
        epochs=3,
        batch_size=64,
        limit_train=4096,
        limit_test=1000,
        out=str(tmp_path / "run"),
        device="cpu",
        seed=0,
        eval_every=3,
    )
    res = train(cfg, data=cifar_small, progress=False, log=quiet)  # 192 steps
    final = res["final"]
    assert res["status"] == "finished" and res["epochs_completed"] == 3
    assert final["clean_acc"] > 0.22, final  # chance is 0.10
    cert = final["certified"]
    assert list(cert) == ["36/255", "72/255", "108/255"], final  # files key radii by their text
    assert cert["36/255"] > 0.02, final
    assert cert["36/255"] <= final["clean_acc"]
    assert cert["108/255"] <= cert["72/255"] <= cert["36/255"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["final"] == final and len(saved["history"]) == 3 and saved["wall_time_s"] > 0
    for key in ("torch_version", "cpl_mini_version", "device", "config"):
        assert key in saved
    # a short run never pays for a compilation: "auto" resolved to eager, and the record says why
    assert saved["compile"]["setting"] == "auto" and saved["compile"]["compiled"] is False
    assert "compile cost" in saved["compile"]["reason"]


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    data = synthetic(n_train=256, n_test=64)
    common = dict(size="XS", epochs=3, batch_size=64, device="cpu", seed=1, eval_every=3)
    full = train(TrainConfig(out=str(tmp_path / "a"), **common), data=data, progress=False, log=quiet)
    cfg_b = TrainConfig(out=str(tmp_path / "b"), **common)
    part = train(cfg_b, data=data, progress=False, log=quiet, stop_after_epoch=1)
    assert part["status"] == "stopped" and part["epochs_completed"] == 1
    resumed = train(cfg_b, data=data, progress=False, log=quiet)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="epochs"):
        train(
            TrainConfig(out=str(tmp_path / "b"), **{**common, "epochs": 5}),
            data=data,
            progress=False,
            log=quiet,
        )


class _FastGrowingScaler(torch.amp.GradScaler):
    """The scale doubles after every step from 2**10: its state differs from a fresh scaler's at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, init_scale=2.0**10, growth_interval=1, **kwargs)


def test_fp16_resume_restores_the_gradient_scaler(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.amp, "GradScaler", _FastGrowingScaler)
    data = synthetic(n_train=64, n_test=16)  # one step an epoch (fp16 is emulated, slowly, on CPUs)
    common = dict(size="XS", epochs=2, batch_size=64, device="cpu", seed=2, amp="fp16", eval_every=5)
    train(TrainConfig(out=str(tmp_path / "a"), **common), data=data, progress=False, log=quiet)
    cfg_b = TrainConfig(out=str(tmp_path / "b"), **common)
    train(cfg_b, data=data, progress=False, log=quiet, stop_after_epoch=1)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["scaler"]["scale"] > 2.0**10
    train(cfg_b, data=data, progress=False, log=quiet)
    a, b = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("a", "b"))
    assert a["scaler"] == b["scaler"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = synthetic(n_train=128, n_test=32)
    cfg = TrainConfig(
        size="XS", epochs=3, batch_size=64, device="cpu", out=str(tmp_path / "run"), eval_every=10
    )
    real = train_mod.margin_loss
    calls = {"n": 0}

    def flaky(logits, labels, margin=0.7):
        calls["n"] += 1
        loss = real(logits, labels, margin)
        return loss * float("nan") if calls["n"] > 2 else loss  # epoch 2 diverges

    monkeypatch.setattr(train_mod, "margin_loss", flaky)
    res = train(cfg, data=data, progress=False, log=quiet)
    assert res["status"] == "nan" and "seed" in res["message"] and res["epochs_completed"] == 1
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "nan"


def _torchrun(n, out, *args, timeout=300):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        str(HERE / "ddp_worker.py"),
        str(out),
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_ddp_two_processes_match_one_process(tmp_path):
    """gloo, 2 processes with half the batch each == 1 process with the whole batch (no augmentation);
    the evaluation, split over the processes, covers the whole test set."""
    for n in (1, 2):
        proc = _torchrun(n, tmp_path / f"p{n}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_checkpoint(tmp_path / "p1" / "checkpoint.pt")["model"]
    two = load_checkpoint(tmp_path / "p2" / "checkpoint.pt")["model"]
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=1e-4), key
    assert any(not torch.equal(one[k], synthetic_init()[k]) for k in one if k.endswith("weight"))
    for n in (1, 2):
        entry = json.loads((tmp_path / f"p{n}" / "results.json").read_text())["history"][-1]
        assert entry["eval_images"] == 64, entry


def test_ddp_nan_on_one_process_stops_every_process(tmp_path):
    """Only process 1's loss becomes NaN (in epoch 2 of 3): both stop there, none hangs, both report it."""
    out = tmp_path / "run"
    try:
        proc = _torchrun(
            2,
            out,
            "--epochs",
            "3",
            "--n-train",
            "128",
            "--nan-rank",
            "1",
            "--nan-from-step",
            "3",
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the processes hung after a NaN on one of them")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        status = json.loads((tmp_path / "run-status" / f"rank{rank}.json").read_text())
        assert status == {"status": "nan", "epochs_completed": 1}, (rank, status)
    assert json.loads((out / "results.json").read_text())["status"] == "nan"
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1


def synthetic_init():
    from cpl_mini.models import cpl_network

    torch.manual_seed(3)
    return cpl_network("XS", mean=torch.zeros(3)).state_dict()


# -- your own network ---------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """A small network of the package's layers, with a dropout (it draws random numbers while training)."""

    def __init__(self, num_classes=10, channels=8, features=32):
        super().__init__()
        self.body = nn.Sequential(
            ChannelPad(channels),
            ConvexPotentialConv2d(channels, 4, 3, (32, 32)),
            LipschitzAvgPool2d(4),
            nn.Flatten(),
            ConvexPotentialLinear(channels * 64, features),
            nn.Dropout(0.2),
            FirstCoordinates(num_classes),
        )

    def forward(self, x):
        return self.body(x)

    def lipschitz_bound(self):
        return lipschitz_upper_bound(self.body)


class OtherNet(TinyNet):
    """The same parameters and buffers as TinyNet, another class."""


def tiny(config):
    return TinyNet(config.num_classes)


class Doubler(nn.Module):
    """A part without a ``lipschitz_bound()``: the pipeline cannot certify a network holding it."""

    def forward(self, x):
        return 2 * x


OWN = dict(epochs=2, batch_size=128, limit_train=512, limit_test=256, device="cpu", seed=4, compile="off")


@pytest.fixture(scope="module")
def own_runs(cifar_small, tmp_path_factory):
    """Runs of TinyNet through the factory: a (2 epochs), b (stopped after 1, then continued), c (a copy
    of b stopped after 1)."""
    root = tmp_path_factory.mktemp("own")
    torch.manual_seed(123)  # the factory must not depend on the generator's state before the run
    full = train(
        TrainConfig(out=str(root / "a"), **OWN), data=cifar_small, progress=False, log=quiet, model=tiny
    )
    cfg_b = TrainConfig(out=str(root / "b"), **OWN)
    part = train(cfg_b, data=cifar_small, progress=False, log=quiet, model=tiny, stop_after_epoch=1)
    shutil.copytree(root / "b", root / "c")
    resumed = train(cfg_b, data=cifar_small, progress=False, log=quiet, model=tiny)
    return root, full, part, resumed


def _results(entry):
    return {k: v for k, v in entry.items() if "seconds" not in k}


def test_own_network_resumes_bit_exactly(own_runs):
    root, full, part, resumed = own_runs
    assert part["status"] == "stopped" and resumed["status"] == full["status"] == "finished"
    assert _results(part["history"][0]) == _results(full["history"][0])  # seeded before the factory
    assert [_results(h) for h in resumed["history"]] == [_results(h) for h in full["history"]]
    a, b = (load_checkpoint(root / name / "checkpoint.pt") for name in ("a", "b"))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_own_network_is_recorded_with_its_architecture(own_runs):
    root, full, _, _ = own_runs
    saved = json.loads((root / "a" / "results.json").read_text())
    expected = ["0.mean (1, 3, 1, 1)"] + [
        f"1.{k} {tuple(v.shape)}" for k, v in TinyNet().state_dict().items()
    ]
    assert saved["network"] == "custom (TinyNet)" and saved["config"]["model"] is None
    assert saved["architecture"] == {"class": "TinyNet", "tensors": expected}
    assert saved["parameters"] == sum(p.numel() for p in TinyNet().parameters())
    assert list(saved["final"]["certified"]) == ["36/255", "72/255", "108/255"]
    assert 0 <= saved["final"]["certified"]["36/255"] <= saved["final"]["clean_acc"]
    assert saved["history"][-1]["eval_images"] == 256 and saved["history"][-1]["lipschitz"] >= 1.0
    ckpt = load_checkpoint(root / "a" / "checkpoint.pt")
    assert ckpt["architecture"] == saved["architecture"] and ckpt["model_config"]["class"] == "TinyNet"


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda c: TinyNet(c.num_classes, features=48), r"1\.body\.4\.weight \(32, 512\)"),
        (lambda c: OtherNet(c.num_classes), "TinyNet"),
        (None, "holds a network with"),  # the CPL network of config.size
    ],
    ids=["wider", "other-class", "cpl"],
)
def test_continuing_with_another_architecture_is_refused(own_runs, cifar_small, factory, match):
    root = own_runs[0]
    files = [root / "c" / name for name in ("checkpoint.pt", "results.json")]
    before = [f.read_bytes() for f in files]
    with pytest.raises(CheckpointError, match=match):
        train(
            TrainConfig(out=str(root / "c"), **OWN),
            data=cifar_small,
            progress=False,
            log=quiet,
            model=factory,
        )
    assert [f.read_bytes() for f in files] == before


def test_a_network_that_cannot_be_certified_is_refused_before_training(tmp_path):
    data = synthetic(n_train=128, n_test=16)
    cfg = TrainConfig(epochs=1, batch_size=64, device="cpu", out=str(tmp_path / "run"))

    def unknown_part(config):
        return nn.Sequential(ChannelPad(4), Doubler(), nn.Flatten(), FirstCoordinates(10))

    with pytest.raises(ValueError, match="Doubler.*cpl_mini.bounds") as err:
        train(cfg, data=data, progress=False, log=quiet, model=unknown_part)
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(ValueError, match=r"logits of shape \(2, 10\)"):
        train(
            cfg, data=data, progress=False, log=quiet, model=nn.Sequential(nn.Flatten(), FirstCoordinates(5))
        )
    with pytest.raises(ValueError, match="model="):  # a name in the config is never imported by train
        train(TrainConfig(**{**vars(cfg), "model": "mynets:make_net"}), data=data, progress=False, log=quiet)
    assert not (tmp_path / "run").exists()


def test_a_finished_run_is_returned_as_recorded_and_nothing_is_written(tmp_path, monkeypatch):
    data = synthetic(n_train=128, n_test=16)
    cfg = TrainConfig(size="XS", epochs=1, batch_size=64, device="cpu", out=str(tmp_path / "run"))
    first = train(cfg, data=data, progress=False, log=quiet)
    files = [tmp_path / "run" / name for name in ("results.json", "checkpoint.pt")]
    before = [(f.stat().st_ino, f.stat().st_mtime_ns, f.read_bytes()) for f in files]
    monkeypatch.setattr(train_mod, "device_name", lambda device: "another machine")
    again = train(cfg, data=data, progress=False, log=quiet)
    assert again == first and again["device"] != "another machine"
    assert [(f.stat().st_ino, f.stat().st_mtime_ns, f.read_bytes()) for f in files] == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "results.json"]


def test_ctrl_c_records_interrupted_and_the_run_continues_later(tmp_path, monkeypatch):
    data = synthetic(n_train=128, n_test=16)
    cfg = TrainConfig(
        size="XS", epochs=2, batch_size=64, device="cpu", out=str(tmp_path / "run"), eval_every=5
    )
    real, calls = train_mod.margin_loss, {"n": 0}

    def interrupted(logits, labels, margin=0.7):
        calls["n"] += 1
        if calls["n"] == 3:  # first step of epoch 2
            raise KeyboardInterrupt
        return real(logits, labels, margin)

    monkeypatch.setattr(train_mod, "margin_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data=data, progress=False, log=quiet)
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "interrupted" and record["epochs_completed"] == 1
    assert "run the same command again" in record["message"]
    res = train(cfg, data=data, progress=False, log=quiet)
    assert res["status"] == "finished" and res["epochs_completed"] == 2


def test_an_error_during_training_is_recorded_as_failed(tmp_path, monkeypatch):
    data = synthetic(n_train=128, n_test=16)
    cfg = TrainConfig(
        size="XS", epochs=2, batch_size=64, device="cpu", out=str(tmp_path / "run"), eval_every=5
    )
    real, calls = train_mod.margin_loss, {"n": 0}

    def broken(logits, labels, margin=0.7):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory")
        return real(logits, labels, margin)

    monkeypatch.setattr(train_mod, "margin_loss", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(cfg, data=data, progress=False, log=quiet)
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["status"] == "failed" and "RuntimeError: out of memory" in record["message"]


def test_bad_input_fails_clearly_and_leaves_no_folder(tmp_path):
    data = synthetic(n_train=128, n_test=16)
    small = TrainConfig(
        size="XS", epochs=1, batch_size=256, limit_train=100, device="cpu", out=str(tmp_path / "a")
    )
    with pytest.raises(ValueError, match="--limit-train 100") as err:
        train(small, data=data, progress=False, log=quiet)
    assert "drop_last" not in str(err.value) and "--batch-size" in str(err.value)
    bad = synthetic(n_train=128, n_test=16)
    bad.train_labels[5] = 10
    cfg = TrainConfig(size="XS", epochs=1, batch_size=64, device="cpu", out=str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"training labels must lie in \[0, 10\).*10"):
        train(cfg, data=bad, progress=False, log=quiet)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path):
    cfg = TrainConfig(size="XS", epochs=1, device="cuda", out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="no CUDA"):
        train(cfg, data=synthetic(n_train=64, n_test=8), progress=False, log=quiet)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "capability, expected",
    [
        ((7, 5), torch.float16),
        ((7, 0), torch.float16),
        ((6, 1), torch.float16),
        ((8, 0), torch.bfloat16),
        ((9, 0), torch.bfloat16),
    ],
)
def test_cuda_autocast_is_bf16_only_where_the_gpu_computes_in_bf16(monkeypatch, capability, expected):
    # a T4 (7.5) or V100 (7.0) reports bf16 "supported" through emulation; only compute capability 8.0+ has it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert autocast_dtype(cuda, "auto") == expected
    assert autocast_dtype(cuda, "bf16") == torch.bfloat16 and autocast_dtype(cuda, "off") is None


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs /proc/cpuinfo")
def test_proc_cpuinfo_is_read_once(monkeypatch):
    cpu_info.cache_clear()
    opened, real_open = [], builtins.open

    def counting_open(file, *args, **kwargs):
        if str(file) == "/proc/cpuinfo":
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    cpu = torch.device("cpu")
    for _ in range(3):
        autocast_dtype(cpu, "auto")
        device_name(cpu)
    assert len(opened) == 1
    name, flags = cpu_info()
    assert name and name in device_name(cpu)
    with real_open("/proc/cpuinfo") as f:
        first_flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    assert flags == frozenset(first_flags)
    cpu_info.cache_clear()


def test_compile_rule_on_the_measured_runs():
    # AMD EPYC Zen 4, 2 threads: CPU network 392.7 img/s eager, S 116.9 img/s; batch 256, 195 steps an epoch
    cpu_net = compile_decision(20 * 195, 256 / 392.7, cpl_layers=11)
    s_net = compile_decision(20 * 195, 256 / 116.9, cpl_layers=27)
    assert cpu_net["compile"] and s_net["compile"]
    assert cpu_net["estimated_cost_s"] == pytest.approx(43.2)
    assert s_net["estimated_cost_s"] == pytest.approx(94.4)
    # the quick XS run of CI (2 epochs of 16 steps), a test run, one short epoch of the CPU network: eager
    assert not compile_decision(2 * 16 - 6, 0.2, cpl_layers=6)["compile"]
    assert not compile_decision(186, 0.1, cpl_layers=6)["compile"]
    assert not compile_decision(8, 0.65, cpl_layers=11)["compile"]
    assert not compile_decision(3, None, cpl_layers=11)["compile"]
    # a short run timed on a busy machine (slow eager steps) still stays eager
    assert not compile_decision(400, 5.0, cpl_layers=6)["compile"]
    # the saving must clearly exceed the cost: just above break-even is not enough
    break_even = 43.2 / (0.19 * 0.65)
    assert not compile_decision(int(1.5 * break_even), 0.65, cpl_layers=11)["compile"]
    assert compile_decision(int(2.1 * break_even), 0.65, cpl_layers=11)["compile"]
    assert not compile_decision(10**6, 1.0, cpl_layers=11, device_type="mps")["compile"]
