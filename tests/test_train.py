"""cpl_mini.train: the recipe, real CIFAR-10 learning, exact resume, safe checkpoints, NaN stop, DDP, CLI."""
import json
import os
import pathlib
import pickle
import subprocess
import sys

import pytest
import torch

from cpl_mini import train as train_mod
from cpl_mini.data import load_cifar
from cpl_mini.train import (CheckpointError, TrainConfig, load_checkpoint, lr_at, margin_loss, save_checkpoint,
                            train)

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
    manual = torch.stack([sum(torch.clamp(0.7 - logits[i, y[i]] + logits[i, j], min=0) for j in range(5) if j != y[i]) / 5
                          for i in range(7)]).mean()
    assert margin_loss(logits, y, 0.7).item() == pytest.approx(manual.item(), rel=1e-6)


@pytest.fixture(scope="module")
def cifar_small(cifar_root):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = load_cifar("cifar10", root=cifar_root, download=False)
    return data


def test_tiny_model_learns_real_cifar10(cifar_small, tmp_path):
    cfg = TrainConfig(size="XS", epochs=3, batch_size=64, limit_train=4096, limit_test=1000, out=str(tmp_path / "run"),
                      device="cpu", seed=0, eval_every=3)
    res = train(cfg, data=cifar_small, progress=False, log=quiet)  # 192 steps
    final = res["final"]
    assert res["status"] == "finished" and res["epochs_completed"] == 3
    assert final["clean_acc"] > 0.22, final  # chance is 0.10
    assert final["cert_36"] > 0.02, final
    assert final["cert_36"] <= final["clean_acc"] and final["cert_108"] <= final["cert_72"] <= final["cert_36"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["final"] == final and len(saved["history"]) == 3 and saved["wall_time_s"] > 0
    for key in ("torch_version", "cpl_mini_version", "device", "config"):
        assert key in saved


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
        train(TrainConfig(out=str(tmp_path / "b"), **{**common, "epochs": 5}), data=data, progress=False, log=quiet)


def test_corrupt_foreign_and_malicious_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a whole checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)
    torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError, match="not a cpl_mini checkpoint"):
        load_checkpoint(bad)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "cpl_mini-checkpoint-v1", "x": Evil()}, bad)
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="train first"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, opt, 1, TrainConfig(), [], 10)
    before = path.read_bytes()

    def broken_save(obj, f):
        pathlib.Path(f).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, model, opt, 2, TrainConfig(), [], 20)
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = synthetic(n_train=128, n_test=32)
    cfg = TrainConfig(size="XS", epochs=3, batch_size=64, device="cpu", out=str(tmp_path / "run"), eval_every=10)
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


def test_ddp_two_processes_match_one_process(tmp_path):
    """gloo, 2 processes with half the batch each == 1 process with the whole batch (no augmentation)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(HERE / "ddp_worker.py"), str(tmp_path / f"p{n}")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_checkpoint(tmp_path / "p1" / "checkpoint.pt")["model"]
    two = load_checkpoint(tmp_path / "p2" / "checkpoint.pt")["model"]
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=1e-4), key
    assert any(not torch.equal(one[k], synthetic_init()[k]) for k in one if k.endswith("weight"))


def synthetic_init():
    from cpl_mini.models import cpl_network

    torch.manual_seed(3)
    return cpl_network("XS").state_dict()


def test_cli_end_to_end(cifar_root, tmp_path):
    env = {**os.environ, "CPL_MINI_DATA": str(cifar_root), "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "cpl_mini.train", "--size", "XS", "--epochs", "1", "--batch-size", "64",
                          "--limit-train", "256", "--limit-test", "100", "--out", str(out), "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "epoch 1/1" in run.stdout and (out / "results.json").exists()
    cert = subprocess.run([sys.executable, "-m", "cpl_mini.certify", str(out), "--json"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert cert.returncode == 0, cert.stderr[-2000:]
    table = json.loads(cert.stdout.strip().splitlines()[-1])
    assert table["n"] == 100 and set(table["certified"]) == {"36/255", "72/255", "108/255"}
    saved = json.loads((out / "results.json").read_text())["final"]
    assert table["accuracy"] == pytest.approx(saved["clean_acc"])
    bad = subprocess.run([sys.executable, "-m", "cpl_mini.train", "--size", "XS", "--epochs", "2", "--batch-size", "64",
                          "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "epochs" in bad.stderr
