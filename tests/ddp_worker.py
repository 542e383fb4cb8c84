"""Run by tests/test_train.py under torchrun: the same training on synthetic data, 1 or 2 processes."""
import sys

import torch

from cpl_mini.data import CifarData
from cpl_mini.train import TrainConfig, train


def synthetic(n_train=256, n_test=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CifarData(torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (n_train,), generator=g),
                     torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (n_test,), generator=g), [str(i) for i in range(10)], "cifar10")


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = sys.argv[1]
    cfg = TrainConfig(size="XS", epochs=1, batch_size=64, augment=False, out=out, device="cpu", seed=3,
                      channels_last=False, amp="off", threads=1)
    train(cfg, data=synthetic(), progress=False, log=lambda *a: None)
