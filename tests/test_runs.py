"""cpl_mini.runs: the configuration and its identity, safe checkpoints, trained models that carry their
input normalisation."""

import dataclasses
import os
import pathlib
import stat
import struct
import sys
import zipfile
from fractions import Fraction

import pytest
import torch
import torch.nn as nn

from cpl_mini.bounds import lipschitz_upper_bound
from cpl_mini.certify import certified_accuracy
from cpl_mini.cifar import CifarData
from cpl_mini.layers import ChannelPad, ConvexPotentialConv2d, FirstCoordinates, LipschitzAvgPool2d
from cpl_mini.loader import channel_stats
from cpl_mini.models import cpl_network
from cpl_mini.normalization import InputNormalization
from cpl_mini.runs import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    TrainConfig,
    check_same_run,
    identity_fields,
    load_checkpoint,
    load_model_state,
    load_run_model,
    run_network,
    save_checkpoint,
)
from cpl_mini.train import train

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ddp_worker import synthetic  # noqa: E402


def quiet(*args):
    pass


def _tiny_checkpoint(path, config=None):
    config = config or TrainConfig(size="XS")
    model = run_network(config, torch.rand(3), torch.rand(3) + 0.1)
    opt = torch.optim.Adam(model.parameters())
    save_checkpoint(path, model, opt, 1, config, [], 10)
    return model


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

    torch.save({"format": CHECKPOINT_FORMAT, "x": Evil()}, bad)
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="train first"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_an_empty_checkpoint_file_is_a_clear_error(tmp_path):
    empty = tmp_path / "checkpoint.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(empty)


def test_one_flipped_byte_inside_a_tensor_is_detected(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _tiny_checkpoint(path)
    assert load_checkpoint(path)["epoch"] == 1
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)  # the largest tensor's bytes
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    assert info.compress_type == zipfile.ZIP_STORED
    raw[start + info.file_size // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="CRC"):
        load_checkpoint(path)


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


def test_the_file_and_its_folder_are_synced_around_the_rename(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync-dir" if stat.S_ISDIR(st.st_mode) else "fsync-file", st.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    save_checkpoint(tmp_path / "checkpoint.pt", model, opt, 1, TrainConfig(), [], 1)
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync-file", "replace", "fsync-dir"], events
    assert events[0][1] == events[1][1] == (tmp_path / "checkpoint.pt").stat().st_ino
    assert events[2][1] == tmp_path.stat().st_ino


def test_identity_fields_are_exactly_those_that_change_the_run():
    assert set(identity_fields()) == {
        "dataset",
        "size",
        "model",
        "epochs",
        "batch_size",
        "lr",
        "margin",
        "seed",
        "amp",
        "augment",
        "std_normalize",
        "limit_train",
        "limit_test",
        "head",
    }


@pytest.mark.parametrize(
    "name, value",
    [
        ("std_normalize", True),
        ("augment", False),
        ("limit_train", 512),
        ("limit_test", 100),
        ("amp", "off"),
        ("head", "lln"),
        ("seed", 5),
        ("lr", 2e-3),
        ("margin", 0.5),
        ("dataset", "cifar100"),
        ("size", "S"),
        ("batch_size", 128),
        ("epochs", 3),
        ("model", "mynets:make_net"),
    ],
)
def test_continuing_with_another_identity_value_names_the_field(name, value):
    saved = dataclasses.asdict(TrainConfig(size="XS", epochs=2))
    changed = dataclasses.replace(TrainConfig(size="XS", epochs=2), **{name: value})
    with pytest.raises(CheckpointError, match=f"{name}=.*--{name.replace('_', '-')}"):
        check_same_run(saved, changed, "run/checkpoint.pt")


def test_where_and_how_fast_may_change_when_a_run_is_continued():
    saved = dataclasses.asdict(TrainConfig(size="XS", epochs=2))
    changed = dataclasses.replace(
        TrainConfig(size="XS", epochs=2),
        device="cpu",
        compile="off",
        threads=1,
        eval_every=2,
        channels_last="off",
        out="elsewhere",
        data_root="data",
    )
    check_same_run(saved, changed, "run/checkpoint.pt")


@pytest.mark.parametrize(
    "bad",
    [
        dict(epochs=0),
        dict(epochs=-3),
        dict(batch_size=0),
        dict(lr=0.0),
        dict(limit_train=0),
        dict(size="XXL"),
        dict(amp="fp8"),
        dict(compile="maybe"),
        dict(augment="yes"),
        dict(eval_every=0),
    ],
)
def test_config_refuses_values_that_cannot_make_a_run(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


@pytest.mark.parametrize(
    "size, canonical",
    [
        ("xs", "XS"),
        ("CPU", "CPU"),
        ("20,7,45,2048", "20,7,45,2048"),
        ("(20, 7, 45, 2048)", "20,7,45,2048"),
        ("20x7x45x2048", "20,7,45,2048"),
        ((4, 2, 16, 256), "4,2,16,256"),
    ],
)
def test_config_stores_one_spelling_of_a_size(size, canonical):
    assert TrainConfig(size=size).size == canonical
    assert TrainConfig.from_dict(dataclasses.asdict(TrainConfig(size=size))).size == canonical


def test_a_size_given_by_its_numbers_builds_that_network():
    net = run_network(TrainConfig(size="(3, 1, 8, 64)"))
    assert sum(isinstance(m, ConvexPotentialConv2d) for m in net) == 3 and net.config["size"] == "3,1,8,64"
    assert net.config["channels"] == 8 and net.config["features"] == 64 and net.config["depth_linear"] == 1


@pytest.mark.parametrize(
    "size", ["20,7,45", "20;7;45;2048", "(20,7,45,2048", "20,7x45,2048", "1,1,0,8", "XXL"]
)
def test_a_bad_size_is_one_line_listing_the_forms(size):
    with pytest.raises(ValueError, match=r"20,7,45,2048 or \(20, 7, 45, 2048\) or 20x7x45x2048") as err:
        TrainConfig(size=size)
    assert len(str(err.value).splitlines()) == 1 and "XS, CPU, S, M, L, XL" in str(err.value)


def test_a_size_with_fewer_channels_than_the_pictures_is_refused():
    with pytest.raises(ValueError, match=r"size 1,1,2,8: the channels \(2\) must be >= the pictures' 3"):
        TrainConfig(size="1,1,2,8")


def test_config_normalises_its_switches():
    cfg = TrainConfig(size="xs", compile=True, channels_last=False)
    assert (cfg.size, cfg.compile, cfg.channels_last) == ("XS", "on", "off")
    assert TrainConfig(compile="false").compile == "off" and TrainConfig().compile == "auto"


def test_a_checkpoint_for_10_classes_does_not_load_into_a_5_class_network(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _tiny_checkpoint(path)  # cifar10: 10 classes
    five = cpl_network("XS", num_classes=5, mean=torch.zeros(3))
    with pytest.raises(CheckpointError, match="num_classes=10.*num_classes=5"):
        load_model_state(five, load_checkpoint(path))
    ten = cpl_network("XS", num_classes=10, mean=torch.zeros(3))
    load_model_state(ten, load_checkpoint(path))


@pytest.fixture(scope="module")
def std_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "std"
    data = synthetic(n_train=128, n_test=32)
    cfg = TrainConfig(size="XS", epochs=1, batch_size=64, device="cpu", std_normalize=True, out=str(out))
    results = train(cfg, data=data, progress=False, log=quiet)
    return out, data, results


def test_load_run_model_gives_the_same_logits_whatever_cifar_copy_is_present(std_run):
    out, data, _ = std_run
    model, loader, config = load_run_model(out, data=data, device="cpu")
    assert isinstance(config, TrainConfig) and config.std_normalize and config.size == "XS"
    mean, std = channel_stats(data.train_images)
    assert isinstance(model[0], InputNormalization)
    assert torch.equal(model[0].mean.flatten(), mean) and torch.equal(model[0].std.flatten(), std)
    # another copy of CIFAR, with different training pictures (so different statistics)
    other = CifarData(
        255 - data.train_images,
        data.train_labels,
        data.test_images,
        data.test_labels,
        data.classes,
        data.name,
    )
    model2, loader2, _ = load_run_model(out, data=other, device="cpu")
    x = data.test_images[:16].float() / 255
    with torch.no_grad():
        assert torch.equal(model(x), model2(x))
    xb, _ = next(iter(loader))
    assert float(xb.min()) >= 0 and float(xb.max()) <= 1  # the loader gives raw pixels


def test_a_model_trained_with_std_normalize_certifies_with_bound_one_over_min_std(std_run):
    out, data, results = std_run
    model, loader, _ = load_run_model(out, data=data, device="cpu")
    _, std = channel_stats(data.train_images)
    exact = 1 / Fraction(float(std.min()))
    res = certified_accuracy(model, loader, input_lipschitz=1.0)
    assert Fraction(res["lipschitz"]) >= exact and res["lipschitz"] == pytest.approx(float(exact), rel=1e-12)
    assert results["history"][-1]["lipschitz"] == res["lipschitz"]  # the training pipeline's bound too


def test_book_config_picks_the_run_by_mode_device_and_native_bf16(monkeypatch):
    import cpl_mini.fastpath as fastpath
    from cpl_mini.runs import book_config

    assert book_config("cpu", quick=True).size == "XS"
    assert book_config("cuda", quick=False).size == "S"
    s, small = book_config("cpu", quick=False, cpu_bf16=True), book_config("cpu", quick=False, cpu_bf16=False)
    assert (s.size, s.epochs, s.out) == ("S", 20, "runs/cifar10-S-20ep")
    assert (small.size, small.epochs, small.out) == ("CPU", 20, "runs/cifar10-CPU-20ep")
    for flags, size in (
        (frozenset({"avx2"}), "CPU"),
        (frozenset({"avx512_bf16"}), "S"),
        (frozenset({"amx_bf16"}), "S"),
    ):
        monkeypatch.setattr(fastpath, "cpu_info", lambda flags=flags: ("a CPU", flags))
        assert book_config("cpu", quick=False).size == size, flags
    committed = {p.stem for p in (HERE.parent / "book" / "results").glob("*.json")}
    assert {pathlib.Path(c.out).name for c in (s, small)} <= committed


# -- your own network ----------------------------------------------------------------------------------
class SmallNet(nn.Module):
    def __init__(self, num_classes=10, channels=6):
        super().__init__()
        self.body = nn.Sequential(
            ChannelPad(channels),
            ConvexPotentialConv2d(channels, 3, 3, (32, 32)),
            LipschitzAvgPool2d(4),
            nn.Flatten(),
            FirstCoordinates(num_classes),
        )

    def forward(self, x):
        return self.body(x)

    def lipschitz_bound(self):
        return lipschitz_upper_bound(self.body)


def small_net(config):
    return SmallNet(config.num_classes)


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """A run of SmallNet, as the command line's --model planted_nets:make_net records it."""
    out = tmp_path_factory.mktemp("runs") / "own"
    data = synthetic(n_train=128, n_test=32)
    cfg = TrainConfig(
        model="planted_nets:make_net", epochs=1, batch_size=64, device="cpu", std_normalize=True, out=str(out)
    )
    results = train(cfg, data=data, progress=False, log=quiet, model=small_net)
    return out, data, results


def test_load_run_model_needs_your_model_and_never_imports_what_the_checkpoint_names(
    own_run, tmp_path, monkeypatch
):
    out, data, _ = own_run
    marker = tmp_path / "imported"
    (tmp_path / "planted_nets.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ValueError, match=r"custom \(SmallNet\).*--model planted_nets:make_net.*model="
    ) as err:
        load_run_model(out, data=data, device="cpu")
    assert len(str(err.value).splitlines()) == 1 and "never imported" in str(err.value)
    assert not marker.exists() and "planted_nets" not in sys.modules


def test_load_run_model_with_your_model_gives_the_trained_logits(own_run):
    out, data, _ = own_run
    model, loader, config = load_run_model(out, data=data, device="cpu", model=small_net)
    assert config.model == "planted_nets:make_net" and not model.training
    # the reference: SmallNet with the checkpoint's weights on pictures normalised by hand
    state = load_checkpoint(out / "checkpoint.pt")["model"]
    net = SmallNet().eval()
    net.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("1.")})
    mean, std = channel_stats(data.train_images)
    x = data.test_images[:8].float() / 255
    with torch.no_grad():
        reference = net((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
        logits = model(x)
        assert torch.allclose(logits, reference, atol=1e-5)
        instance, _, _ = load_run_model(out, data=data, device="cpu", model=SmallNet())
        assert torch.equal(instance(x), logits)
    xb, _ = next(iter(loader))
    assert float(xb.min()) >= 0 and float(xb.max()) <= 1
    with pytest.raises(CheckpointError, match="another architecture.*1.body.1.weight"):
        load_run_model(out, data=data, device="cpu", model=lambda c: SmallNet(channels=9))
