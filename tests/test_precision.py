"""cpl_mini.precision: TF32 switched off and restored; directed rounding against exact rationals."""

import math
import random
from fractions import Fraction

import pytest
import torch

from cpl_mini.precision import (
    as_float64,
    cast_down,
    check_last_dim,
    float64_device,
    float_down,
    float_up,
    gamma,
    has_float64,
    ieee_precision,
    next_down,
    next_up,
    sqrt_up,
    sub_down,
)

b = torch.backends


def snapshot():
    """Every switch that lets float32 run in lower precision, through the legacy and the new readers
    (a reader torch refuses to answer reads as 'refused')."""
    readers = {
        "cuda.matmul.allow_tf32": lambda: b.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": lambda: b.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision,
    }
    for path in ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv"):
        obj = b
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            readers[path + ".fp32_precision"] = lambda obj=obj: obj.fp32_precision
    out = {}
    for name, read in readers.items():
        try:
            out[name] = read()
        except RuntimeError:
            out[name] = "refused"
    return out


def assert_ieee(state):
    assert state["cuda.matmul.allow_tf32"] is False
    assert state["cudnn.allow_tf32"] is False
    assert state["float32_matmul_precision"] == "highest"
    assert all(v == "ieee" for k, v in state.items() if k.endswith("fp32_precision"))


def leaves():
    out = []
    for path in ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn"):
        obj = b
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            out.append(obj)
    return out


@pytest.fixture
def restore_backends():
    """Put the process-wide switches back as they were, whatever a test did (they outlive the test):
    the legacy switches that could be read, then every fp32_precision leaf."""
    saved = snapshot()
    saved_leaves = [(leaf, leaf.fp32_precision) for leaf in leaves()]
    yield
    if saved["float32_matmul_precision"] != "refused":
        torch.set_float32_matmul_precision(saved["float32_matmul_precision"])
    if saved["cuda.matmul.allow_tf32"] != "refused":
        torch.backends.cuda.matmul.allow_tf32 = saved["cuda.matmul.allow_tf32"]
    if saved["cudnn.allow_tf32"] != "refused":
        torch.backends.cudnn.allow_tf32 = saved["cudnn.allow_tf32"]
    for leaf, value in saved_leaves:
        if leaf.fp32_precision != value:
            leaf.fp32_precision = value
    assert snapshot() == saved


def test_tf32_flags_are_off_inside_and_restored_after(restore_backends):
    torch.backends.cuda.matmul.allow_tf32 = True  # what a training script on an A100 typically sets
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    before = snapshot()
    assert before["cuda.matmul.allow_tf32"] is True and before["float32_matmul_precision"] == "high"
    with ieee_precision():
        assert_ieee(snapshot())
        with ieee_precision():  # nested: still off, and the outer block's state after it
            assert_ieee(snapshot())
        assert_ieee(snapshot())
    assert snapshot() == before


def test_flags_restored_when_the_block_raises(restore_backends):
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    before = snapshot()
    with pytest.raises(KeyError):
        with ieee_precision():
            assert_ieee(snapshot())
            raise KeyError("boom")
    assert snapshot() == before


def test_new_style_settings_are_restored_exactly(restore_backends):
    leaf = getattr(b.cuda.matmul, "fp32_precision", None)
    if leaf is None:
        pytest.skip("this torch has no fp32_precision settings")
    b.cuda.matmul.fp32_precision = "tf32"
    b.cudnn.conv.fp32_precision = "tf32"
    before = snapshot()
    with ieee_precision():
        assert_ieee(snapshot())
    assert snapshot() == before


def test_decorator_form(restore_backends):
    @ieee_precision()
    def read():
        return torch.backends.cuda.matmul.allow_tf32

    torch.backends.cuda.matmul.allow_tf32 = True
    assert read() is False and torch.backends.cuda.matmul.allow_tf32 is True


# ---------------------------------------------------------------------------------- directed rounding
def near_pairs(dtype, n=400, seed=0):
    """Pairs (a, b) of floats near ties, at many scales, with both signs."""
    rng = random.Random(seed)
    finfo = torch.finfo(dtype)
    pairs = []
    for _ in range(n):
        a = rng.choice([1.0, -1.0]) * rng.uniform(0.5, 2) * 10.0 ** rng.randint(-6, 6)
        a = float(torch.tensor(a, dtype=dtype))
        kind = rng.random()
        if kind < 0.4:  # a few ulps apart
            bb = a * (1 + rng.randint(-8, 8) * finfo.eps)
        elif kind < 0.7:  # far apart: the difference is rounded
            bb = rng.uniform(-3, 3) * 10.0 ** rng.randint(-20, 6)
        else:
            bb = a * rng.uniform(0.3, 3)
        pairs.append((a, float(torch.tensor(bb, dtype=dtype))))
    return pairs


@pytest.mark.parametrize("dt", [torch.float32, torch.float64], ids=str)
def test_sub_down_is_the_exact_difference_rounded_down(dt):
    pairs = near_pairs(dt)
    a = torch.tensor([p[0] for p in pairs], dtype=dt)
    c = torch.tensor([p[1] for p in pairs], dtype=dt)
    got = sub_down(a, c)
    rounded_up = 0
    for (x, y), g, nearest in zip(pairs, got.tolist(), (a - c).tolist()):
        exact = Fraction(x) - Fraction(y)
        assert Fraction(g) <= exact  # never above
        above = Fraction(float(next_up(torch.tensor(g, dtype=dt))))
        assert above > exact or Fraction(g) == exact  # and the largest float that is
        rounded_up += Fraction(nearest) > exact
    assert rounded_up > 10  # the cases where round-to-nearest is above the exact value do occur


def test_cast_down_and_next():
    x = torch.tensor([1 / 3, -1 / 3, 0.1, 2.0**-30, -7.0, 0.0, math.inf, -math.inf], dtype=torch.float64)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        y = cast_down(x, dt)
        assert y.dtype == dt
        for xi, yi in zip(x.tolist(), y.double().tolist()):
            assert yi <= xi
            up = float(next_up(torch.tensor(yi, dtype=dt)))
            assert up > xi or yi == xi or math.isinf(xi)
    assert torch.equal(cast_down(x, torch.float64), x)
    assert next_down(torch.tensor(1.0)).item() < 1.0 < next_up(torch.tensor(1.0)).item()


def test_scalar_rounding_and_gamma():
    third = Fraction(1, 3)
    assert Fraction(float_down(third)) < third < Fraction(float_up(third))
    assert math.nextafter(float_down(third), 1) == float_up(third)
    assert float_down(0.1) == 0.1 == float_up(0.1)  # exact floats stay
    assert float_up(Fraction(2) ** -1080) > 0 and float_down(-(Fraction(2) ** -1080)) < 0
    u = Fraction(2) ** -53
    assert Fraction(gamma(10)) >= 10 * u / (1 - 10 * u)
    assert gamma(10, torch.float32) == pytest.approx(10 * 2.0**-24, rel=1e-6)
    with pytest.raises(ValueError, match="undefined"):
        gamma(2**24, torch.float32)


def test_float64_devices():
    assert float64_device("cpu") == torch.device("cpu")
    assert float64_device(torch.device("mps")) == torch.device("cpu")  # MPS has no float64
    assert float64_device("cuda:1") == torch.device("cuda:1")
    assert has_float64("cuda") and not has_float64("mps")
    t = torch.randn(3, dtype=torch.float32, requires_grad=True)
    d = as_float64(t)
    assert d.dtype == torch.float64 and not d.requires_grad and torch.equal(d.float(), t.detach())


def test_check_last_dim_message():
    class Layer:
        pass

    check_last_dim(Layer(), torch.zeros(2, 5), 5)
    message = r"Layer expects inputs of shape \(\.\.\., 5\), got \(2, 4\).*features=4"
    with pytest.raises(ValueError, match=message):
        check_last_dim(Layer(), torch.zeros(2, 4), 5)
    with pytest.raises(ValueError, match=r"features=\?"):
        check_last_dim(Layer(), torch.tensor(1.0), 5, "features")


def test_sqrt_up_is_the_smallest_float_whose_square_is_not_below():
    values = [0, 1, 2, 3, Fraction(1, 3), Fraction(9, 4), 1e-300, 2.0**-1074, 1e300, Fraction(7, 10**9)]
    values += [
        Fraction(random.Random(i).randrange(1, 10**12), random.Random(-i).randrange(1, 10**6))
        for i in range(200)
    ]
    for value in values:
        root, exact = sqrt_up(value), Fraction(value)
        assert Fraction(root) ** 2 >= exact, value
        assert root == 0 or Fraction(math.nextafter(root, 0)) ** 2 < exact, value
    with pytest.raises(ValueError, match=">= 0"):
        sqrt_up(-1)
