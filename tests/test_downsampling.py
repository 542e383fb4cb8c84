"""cpl_mini.downsampling: the space-to-channel down-sampling is a permutation of the coordinates (all
singular values 1, inverted exactly by nn.PixelShuffle) and the channel slice a projection; checked with
exact Jacobians, also inside a 1-Lipschitz convolutional network."""

import pytest
import torch
import torch.nn as nn

from cpl_mini.bounds import lipschitz_upper_bound
from cpl_mini.downsampling import ChannelSlice, InvertibleDownsampling
from cpl_mini.normalized import AOLConv2d
from cpl_mini.orthogonal import MaxMin
from cpl_mini.sll import SLLConv2d

DT = torch.float64


def jacobian(f, x):
    jac = torch.autograd.functional.jacobian(f, x, vectorize=True)
    return jac.reshape(-1, x.numel())


@pytest.mark.parametrize("factor", [1, 2, 3])
@pytest.mark.parametrize("channels", [1, 2])
def test_downsampling_is_a_permutation_with_an_exact_inverse(factor, channels):
    down = InvertibleDownsampling(factor)
    x = torch.randn(2, channels, 2 * factor, 3 * factor, dtype=DT)
    y = down(x)
    assert y.shape == (2, channels * factor**2, 2, 3)
    assert torch.equal(down.inverse(y), x)
    assert torch.equal(nn.PixelShuffle(factor)(y), x)
    jac = jacobian(down, x[:1])
    # a permutation matrix: 0/1 entries, one 1 in each row and column; so every singular value is 1
    assert bool(((jac == 0) | (jac == 1)).all())
    assert torch.equal(jac.sum(0), torch.ones(jac.shape[1], dtype=DT))
    assert torch.equal(jac.sum(1), torch.ones(jac.shape[0], dtype=DT))
    assert torch.allclose(torch.linalg.svdvals(jac), torch.ones(jac.shape[0], dtype=DT), atol=1e-12)
    assert down.lipschitz_bound() == 1.0


def test_downsampling_layout():
    """y[:, c f^2 + i f + j, h, w] = x[:, c, f h + i, f w + j], checked entry by entry."""
    f, x = 2, torch.randn(1, 3, 4, 6, dtype=DT)
    y = InvertibleDownsampling(f)(x)
    for c in range(3):
        for i in range(f):
            for j in range(f):
                assert torch.equal(y[0, c * f * f + i * f + j], x[0, c, i::f, j::f])


def test_channel_slice_is_a_projection(device, dtype):
    x = torch.randn(2, 5, 3, 4, device=device, dtype=dtype)
    y = ChannelSlice(2)(x)
    assert y.shape == (2, 2, 3, 4) and torch.equal(y, x[:, :2])
    jac = jacobian(ChannelSlice(2), x[:1].double())
    assert torch.allclose(jac @ jac.T, torch.eye(jac.shape[0], dtype=DT))  # orthonormal rows
    assert torch.linalg.svdvals(jac)[0].item() == pytest.approx(1.0, abs=1e-12)
    assert ChannelSlice(2).lipschitz_bound() == 1.0


def test_modes_and_dtypes(device, dtype):
    down = InvertibleDownsampling(2)
    x = torch.randn(3, 2, 4, 4, device=device, dtype=dtype, requires_grad=True)
    out = down.train()(x)
    assert out.dtype == dtype and out.device == x.device
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert torch.equal(down.eval()(x), out)


def test_bad_inputs_say_what_to_do():
    with pytest.raises(ValueError, match="divisible by 2, got 5x6; pad or crop"):
        InvertibleDownsampling(2)(torch.randn(1, 3, 5, 6))
    with pytest.raises(ValueError, match="unsqueeze"):
        InvertibleDownsampling(2)(torch.randn(3, 4, 4))
    with pytest.raises(ValueError, match="positive integer"):
        InvertibleDownsampling(0)
    with pytest.raises(ValueError, match=r"\(N, C\*4, h, w\)"):
        InvertibleDownsampling(2).inverse(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="C >= 4"):
        ChannelSlice(4)(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="positive integer"):
        ChannelSlice(0)


def test_a_convolutional_network_is_one_lipschitz():
    """AOL stem, SLL blocks, both down-sampling steps and a channel slice: the composed bound is 1 up to
    rounding and the exact Jacobian of the whole network is within it."""
    torch.manual_seed(3)
    net = nn.Sequential(
        AOLConv2d(3, 4),
        SLLConv2d(4, 6),
        InvertibleDownsampling(2),
        SLLConv2d(16),
        MaxMin(),
        AOLConv2d(16, 8, stride=2),
        ChannelSlice(3),
        nn.Flatten(),
    ).to(DT)
    for layer in net:
        if isinstance(layer, SLLConv2d):
            with torch.no_grad():
                layer.log_q.normal_()
    net.eval()
    bound = lipschitz_upper_bound(net)
    assert bound <= 1 + 1e-8
    x = torch.randn(1, 3, 8, 8, dtype=DT)
    assert net(x).shape == (1, 3 * 2 * 2)
    assert torch.linalg.svdvals(jacobian(net, x))[0].item() <= bound
