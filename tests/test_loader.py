"""Tests of cpl_mini.loader: the device-resident loader, channel statistics, the CIFAR loader pair.

Batches are checked against normalisation, crops and flips computed independently in float64; one
module fixture reads the real offline archive (``$CPL_MINI_DATA`` or ``<repo>/../shared/data``).
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpl_mini.cifar import ArchiveChecksumWarning, CifarData, load_cifar
from cpl_mini.loader import DeviceLoader, channel_stats, cifar_loaders


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are small: one intra-op thread is as fast and kinder to a shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------------
# DeviceLoader
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (103, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (103,), generator=g)
    return x, y


def reference(u: torch.Tensor, mean, std=None) -> torch.Tensor:
    """Normalisation computed independently in float64."""
    x = u.double() / 255 - mean.double().view(1, -1, 1, 1)
    return x if std is None else x / std.double().view(1, -1, 1, 1)


def test_eval_loader_in_order(images):
    x, y = images
    loader = DeviceLoader(x, y, 25, train=False, std=True)
    assert len(loader) == 5 and not loader.drop_last and not loader.augment
    mean = x.double().mean(dim=(0, 2, 3)) / 255
    std = (x.double() / 255).permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False)
    assert torch.allclose(loader.mean.flatten().double(), mean, atol=1e-7)
    assert torch.allclose(loader.std.flatten().double(), std, atol=1e-7)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [25, 25, 25, 25, 3]
    for xb, yb in batches:
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert xb.is_contiguous(memory_format=torch.channels_last)
    xs = torch.cat([b[0] for b in batches])
    assert torch.allclose(xs.double(), reference(x, mean, std), atol=1e-5)
    assert torch.equal(torch.cat([b[1] for b in batches]), y)


def test_no_std_and_channels_first(images):
    x, y = images
    loader = DeviceLoader(x, y, 50, train=False, channels_last=False, mean=[0.5, 0.25, 0.0])
    assert loader.std is None and loader.lipschitz_factor == 1.0
    xb, _ = next(iter(loader))
    assert xb.is_contiguous()
    assert torch.allclose(xb.double(), reference(x[:50], torch.tensor([0.5, 0.25, 0.0])), atol=1e-6)


def test_train_epochs_are_seeded(images):
    x, y = images

    def run(epoch, seed=0):
        loader = DeviceLoader(x, y, 16, train=True, seed=seed)
        loader.set_epoch(epoch)
        return list(loader)

    a, b, c, d = run(3), run(3), run(4), run(3, seed=1)
    assert len(a) == 103 // 16  # drop_last for train
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0]) and not torch.equal(a[0][0], d[0][0])
    # resuming: a loader iterated through epochs 0..3 gives the same epoch 3 as a fresh one
    loader = DeviceLoader(x, y, 16, train=True)
    for _ in range(3):
        list(loader)
    assert loader.epoch == 3
    assert all(torch.equal(p[0], q[0]) for p, q in zip(list(loader), a))


def test_permutation_without_augmentation(images):
    x, y = images
    loader = DeviceLoader(x, y, 20, train=True, augment=False, drop_last=False, std=True)
    plan = loader.plan(2)
    assert torch.equal(torch.sort(plan.order).values, torch.arange(103))
    loader.set_epoch(2)
    batches = list(loader)
    xs, ys = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert torch.equal(ys, y[plan.order])
    assert torch.allclose(xs.double(), reference(x[plan.order], loader.mean, loader.std), atol=1e-5)


def test_augmentation_matches_an_independent_crop(images):
    x, y = images
    loader = DeviceLoader(x, y, 32, train=True, seed=7)
    loader.set_epoch(5)
    batches = list(loader)
    plan = loader.plan(5)
    padded = F.pad(x.double(), (4, 4, 4, 4), mode="reflect")  # (N, 3, 40, 40)
    for p in range(len(batches) * 32):
        k, dy, dx, flip = (int(t[p]) for t in (plan.order, plan.dy, plan.dx, plan.flip))
        ref = padded[k, :, dy : dy + 32, dx : dx + 32]
        if flip:
            ref = ref.flip(-1)
        ref = ref / 255 - loader.mean.double()
        got = batches[p // 32][0][p % 32]
        assert torch.allclose(got.double(), ref, atol=1e-6), p
        assert batches[p // 32][1][p % 32] == y[k]
    # the draws cover what they should
    zeros = torch.zeros(4000, 3, 8, 8, dtype=torch.uint8)
    big = DeviceLoader(zeros, torch.zeros(4000, dtype=torch.long), 100, train=True).plan(0)
    assert set(big.dy.tolist()) == set(range(9)) == set(big.dx.tolist())
    assert abs(big.flip.float().mean().item() - 0.5) < 0.05


def test_flip_and_crop_on_a_known_picture():
    """A picture whose pixel value is its column: crops shift, flips reverse the column ramp."""
    cols = torch.arange(32, dtype=torch.uint8).expand(1, 3, 32, 32).repeat(64, 1, 1, 1)
    loader = DeviceLoader(cols, torch.zeros(64, dtype=torch.long), 64, train=True, mean=[0, 0, 0], seed=3)
    xb, _ = next(iter(loader))
    plan = loader.plan(0)
    v = (xb * 255).round().long()[:, 0, 0, :]  # (64, 32) column values of row 0
    for p in range(64):
        dx = int(plan.dx[p])
        want = [abs(j + dx - 4) if j + dx - 4 < 32 else 62 - (j + dx - 4) for j in range(32)]
        if plan.flip[p]:
            want = want[::-1]
        assert v[p].tolist() == want
    assert plan.flip.any() and not plan.flip.all()


def test_world_size_shards(images):
    x, y = images
    one = DeviceLoader(x, y, 24, train=True, seed=2)
    one.set_epoch(1)
    glob = list(one)
    for world in (2, 4):
        shards = []
        for rank in range(world):
            loader = DeviceLoader(x, y, 24, train=True, seed=2, rank=rank, world_size=world)
            loader.set_epoch(1)
            shards.append(list(loader))
            assert len(loader) == len(one)
            assert all(b[0].shape[0] == 24 // world for b in shards[-1])
        for b, (gx, gy) in enumerate(glob):
            assert torch.equal(torch.cat([s[b][0] for s in shards]), gx)
            assert torch.equal(torch.cat([s[b][1] for s in shards]), gy)
    # eval with a final partial batch: shards still cover every row once, in order
    parts = [list(DeviceLoader(x, y, 40, train=False, rank=r, world_size=2)) for r in range(2)]
    ys = torch.cat([torch.cat([parts[r][b][1] for r in range(2)]) for b in range(3)])
    assert torch.equal(ys, y)
    with pytest.raises(ValueError, match="divisible"):
        DeviceLoader(x, y, 25, train=True, world_size=2)


def test_lipschitz_factor(images):
    x, y = images
    loader = DeviceLoader(x, y, 10, train=False, std=[0.5, 0.2, 0.25])
    assert loader.lipschitz_factor == pytest.approx(5.0)
    # the map u -> (u - mean) / std has l2 Lipschitz constant 1 / min(std), attained in channel 1
    std = loader.std.double()

    def f(u):
        return (u - loader.mean.double()) / std

    g = torch.Generator().manual_seed(0)
    a = torch.rand(50, 3, 32, 32, generator=g, dtype=torch.float64)
    b = torch.rand(50, 3, 32, 32, generator=g, dtype=torch.float64)
    ratio = (f(a) - f(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    assert (ratio <= loader.lipschitz_factor + 1e-9).all()
    d = torch.zeros(3, 32, 32, dtype=torch.float64)
    d[1, 4, 4] = 0.1
    assert (f(a[0] + d) - f(a[0])).norm() / d.norm() == pytest.approx(loader.lipschitz_factor)


def test_limit_and_bad_input(images):
    x, y = images
    loader = DeviceLoader(x, y, 10, train=False, limit=30)
    assert loader.num_examples == 30 and len(loader) == 3
    assert torch.allclose(loader.mean.flatten().double(), x.double().mean(dim=(0, 2, 3)) / 255, atol=1e-7)
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(x.float() / 255, y, 10, train=False)
    with pytest.raises(ValueError, match="drop_last"):
        DeviceLoader(x, y, 200, train=True)


# ----------------------------------------------------------------------------------------------------
# channel_stats and cifar_loaders
# ----------------------------------------------------------------------------------------------------
def synthetic_data(n_train=40, n_test=12, seed=0) -> CifarData:
    g = torch.Generator().manual_seed(seed)
    pictures = [
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g) for n in (n_train, n_test)
    ]
    labels = [torch.randint(0, 10, (n,), generator=g) for n in (n_train, n_test)]
    return CifarData(pictures[0], labels[0], pictures[1], labels[1], [str(k) for k in range(10)], "cifar10")


def test_cifar_loaders_share_train_statistics():
    data = synthetic_data()
    train, test = cifar_loaders(data, batch_size=8, std=True, test_batch_size=4)
    assert train.train and train.augment and not test.train and not test.augment
    assert torch.equal(test.mean, train.mean) and torch.equal(test.std, train.std)
    assert test.lipschitz_factor == train.lipschitz_factor == pytest.approx(1 / train.std.min().item())
    xs = torch.cat([b[0] for b in test])
    assert torch.allclose(xs.double(), reference(data.test_images, train.mean, train.std), atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_channel_stats_match_float64(channels):
    g = torch.Generator().manual_seed(channels)
    x = torch.randint(0, 256, (9, channels, 5, 7), dtype=torch.uint8, generator=g)
    x[:, 0] = x[:, 0] // 8  # channels of different statistics
    mean, std = channel_stats(x)
    assert mean.shape == std.shape == (channels,) and mean.dtype == std.dtype == torch.float32
    u = x.double().permute(1, 0, 2, 3).reshape(channels, -1) / 255
    assert torch.allclose(mean.double(), u.mean(dim=1), atol=1e-7)
    assert torch.allclose(std.double(), u.std(dim=1, unbiased=False), atol=1e-7)
    m2, s2 = channel_stats(x.numpy())  # numpy arrays too
    assert torch.equal(m2, mean) and torch.equal(s2, std)
    with pytest.raises(ValueError, match="uint8"):
        channel_stats(x.float() / 255)
    with pytest.raises(ValueError, match="non-empty"):
        channel_stats(x[:0])


def test_cifar_loaders_raw_pixels():
    """normalize=False: batches are u / 255 exactly (train: augmented crops of them, test: in order)."""
    data = synthetic_data()
    train, test = cifar_loaders(data, batch_size=8, test_batch_size=5, normalize=False, seed=3)
    assert train.std is None and test.std is None and train.lipschitz_factor == 1.0
    assert torch.equal(train.mean, torch.zeros(3, 1, 1)) and torch.equal(test.mean, train.mean)
    xs = torch.cat([b[0] for b in test])
    assert torch.equal(xs, data.test_images.float() / 255)  # float32 u / 255, exactly (no shift, no scale)
    assert 0 <= xs.min() and xs.max() <= 1
    plan = train.plan(0)
    padded = F.pad(data.train_images.double(), (4, 4, 4, 4), mode="reflect") / 255
    xb, yb = next(iter(train))
    for p in range(8):
        k, dy, dx, flip = (int(t[p]) for t in (plan.order, plan.dy, plan.dx, plan.flip))
        ref = padded[k, :, dy : dy + 32, dx : dx + 32]
        assert torch.allclose(xb[p].double(), ref.flip(-1) if flip else ref, atol=1e-7)
        assert yb[p] == data.train_labels[k]
    with pytest.raises(ValueError, match="normalize=False"):
        cifar_loaders(data, normalize=False, std=True)
    with pytest.raises(ValueError, match="normalize=False"):
        cifar_loaders(data, normalize=False, mean=[0.5, 0.5, 0.5])


def test_cifar_loaders_options_reach_the_loaders():
    data = synthetic_data()
    train, test = cifar_loaders(
        data,
        batch_size=8,
        augment=False,
        channels_last=False,
        limit_train=24,
        limit_test=10,
        test_batch_size=5,
        seed=7,
    )
    assert not train.augment and (train.num_examples, test.num_examples) == (24, 10) and train.seed == 7
    xb, _ = next(iter(train))
    assert xb.is_contiguous() and not train.channels_last and not test.channels_last
    first = data.train_images[train.plan(0).order[:8]]
    assert torch.allclose(xb.double(), reference(first, train.mean), atol=1e-5)


@pytest.mark.parametrize("shard_test", [True, False])
def test_cifar_loaders_shard_under_ddp(shard_test):
    """rank r of world w yields its slice of each global training batch (and of the test batches when
    shard_test); the shards of all ranks concatenate to the one-process batches."""
    data = synthetic_data()
    one_train, one_test = cifar_loaders(data, batch_size=8, test_batch_size=6, seed=5)
    one_train.set_epoch(2)
    glob, glob_test = list(one_train), list(one_test)
    shards = []
    for rank in range(2):
        train, test = cifar_loaders(
            data, batch_size=8, test_batch_size=6, seed=5, rank=rank, world_size=2, shard_test=shard_test
        )
        train.set_epoch(2)
        shards.append((list(train), list(test)))
        assert (train.rank, train.world_size) == (rank, 2)
        assert (test.rank, test.world_size) == ((rank, 2) if shard_test else (0, 1))
    for b, (gx, gy) in enumerate(glob):
        assert all(s[0][b][0].shape[0] == 4 for s in shards)
        assert torch.equal(torch.cat([s[0][b][0] for s in shards]), gx)
        assert torch.equal(torch.cat([s[0][b][1] for s in shards]), gy)
    for b, (gx, gy) in enumerate(glob_test):
        if shard_test:
            assert torch.equal(torch.cat([s[1][b][0] for s in shards]), gx)
        else:
            assert all(torch.equal(s[1][b][0], gx) and torch.equal(s[1][b][1], gy) for s in shards)


# ----------------------------------------------------------------------------------------------------
# The real offline archive
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(cifar_root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ArchiveChecksumWarning)  # tested in test_cifar.py
        return load_cifar("cifar10", root=cifar_root, download=False)


def real_mean(data):
    """Per-channel mean of the training pictures on the [0, 1] scale, from exact integer sums."""
    n = data.train_images.shape[0]
    sums = data.train_images.numpy().reshape(n, 3, 1024).sum(axis=(0, 2), dtype=np.int64)
    return torch.from_numpy(sums).double() / (n * 1024 * 255)


def test_real_loaders(real):
    data = real
    train, test = cifar_loaders(data, batch_size=128, std=True, limit_train=512, limit_test=300)
    mean = real_mean(data)
    assert torch.allclose(train.mean.flatten().double(), mean, atol=1e-6)
    assert torch.allclose(train.std.flatten(), torch.tensor([0.247, 0.243, 0.261]), atol=5e-3)
    assert torch.equal(test.mean, train.mean) and torch.equal(test.std, train.std)
    assert (len(train), len(test)) == (4, 1)
    x, y = next(iter(train))
    assert x.shape == (128, 3, 32, 32) and y.shape == (128,)
    m, s = channel_stats(data.train_images)
    assert torch.allclose(m.double(), mean, atol=1e-7) and torch.equal(m.view(3, 1, 1), train.mean)
    assert torch.equal(s.view(3, 1, 1), train.std)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(images):
    x, y = images
    cpu = DeviceLoader(x, y, 16, train=True, seed=4, std=True)
    gpu = DeviceLoader(x, y, 16, train=True, seed=4, std=True, device="cuda")
    for (a, ya), (b, yb) in zip(cpu, gpu):
        assert b.device.type == "cuda" and yb.device.type == "cuda"
        assert torch.allclose(a, b.cpu(), atol=1e-6) and torch.equal(ya, yb.cpu())
