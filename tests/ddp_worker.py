"""Run by tests/test_train.py under torchrun: the same training on synthetic data, 1 or 2 processes.

``python ddp_worker.py OUT [--epochs N] [--n-train N] [--nan-rank R --nan-from-step S]``: with
``--nan-rank`` the loss of process ``R`` alone becomes NaN from its ``S``-th step on. Each process
writes ``OUT-status/rank<r>.json`` with the status it returned.
"""

import argparse
import importlib
import json
import os
import pathlib

import torch

from cpl_mini.cifar import CifarData
from cpl_mini.runs import TrainConfig


def synthetic(n_train=256, n_test=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CifarData(
        torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (n_train,), generator=g),
        torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (n_test,), generator=g),
        [str(i) for i in range(10)],
        "cifar10",
    )


def inject_nan(from_step):
    """Make this process's loss NaN from its ``from_step``-th training step on (1-based)."""
    train_mod = importlib.import_module("cpl_mini.train")
    real, calls = train_mod.margin_loss, {"n": 0}

    def poisoned(logits, labels, margin=0.7):
        calls["n"] += 1
        loss = real(logits, labels, margin)
        return loss * float("nan") if calls["n"] >= from_step else loss

    train_mod.margin_loss = poisoned


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--nan-rank", type=int, default=None)
    parser.add_argument("--nan-from-step", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    if args.nan_rank == rank:
        inject_nan(args.nan_from_step)
    from cpl_mini.train import train

    cfg = TrainConfig(
        size="XS",
        epochs=args.epochs,
        batch_size=64,
        augment=False,
        out=args.out,
        device="cpu",
        seed=3,
        channels_last=False,
        amp="off",
        threads=1,
    )
    res = train(cfg, data=synthetic(n_train=args.n_train), progress=False, log=lambda *a: None)
    status = pathlib.Path(args.out + "-status")
    status.mkdir(parents=True, exist_ok=True)
    (status / f"rank{rank}.json").write_text(
        json.dumps({"status": res.get("status"), "epochs_completed": res.get("epochs_completed")})
    )
