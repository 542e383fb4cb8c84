"""cpl_mini.custom: your own network behind the run's input normalisation, the certifiability check, the
architecture's fingerprint and its first difference, importing a factory named on the command line."""

from fractions import Fraction

import pytest
import torch
import torch.nn as nn

from cpl_mini.custom import (
    architecture,
    architecture_difference,
    check_certifiable,
    import_factory,
    network_label,
    own_network,
)
from cpl_mini.layers import ConvexPotentialLinear, FirstCoordinates
from cpl_mini.models import cpl_network
from cpl_mini.runs import TrainConfig


class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


def small(config):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU(), nn.Linear(16, config.num_classes)
    )


def test_own_network_takes_raw_pixels_and_normalises_them_first():
    torch.manual_seed(0)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.5, 0.2])
    net = small(TrainConfig())
    run_net = own_network(net, TrainConfig(std_normalize=True), mean, std).eval()
    assert run_net[1] is net and run_net.config["network"] == "custom (Sequential)"
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        reference = net((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
        assert torch.allclose(run_net(x), reference, atol=1e-6)
    only_mean = own_network(net, TrainConfig(), mean, std).eval()  # std ignored without std_normalize
    with torch.no_grad():
        assert torch.allclose(only_mean(x), net(x - mean.view(1, 3, 1, 1)), atol=1e-6)
    assert only_mean.config["input_normalization"] == "mean"


def test_a_factory_must_return_a_module():
    with pytest.raises(ValueError, match="returned a int, not an nn.Module"):
        own_network(lambda config: 3, TrainConfig())
    with pytest.raises(ValueError, match="nn.Module or a function"):
        own_network("mynets:make_net", TrainConfig())


def test_check_certifiable_returns_the_sound_bound_and_restores_the_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), ConvexPotentialLinear(3 * 32 * 32, 8), FirstCoordinates(10))
    run_net = own_network(
        net, TrainConfig(std_normalize=True), torch.zeros(3), torch.full((3,), 0.25)
    ).train()
    assert check_certifiable(run_net, 10) == 4.0  # 1 / min(std) x 1
    assert run_net.training and all(m.training for m in run_net.modules())


def test_a_part_without_a_bound_and_wrong_logits_are_refused_in_one_line():
    body = nn.Sequential(nn.Flatten(), Doubler(), FirstCoordinates(10))
    with pytest.raises(ValueError, match="Doubler.*cpl_mini.bounds") as err:
        check_certifiable(own_network(body, TrainConfig()), 10)
    assert len(str(err.value).splitlines()) == 1
    with pytest.raises(ValueError, match=r"\(2, 3, 32, 32\) to \(2, 5\).*\(2, 10\)"):
        check_certifiable(nn.Sequential(nn.Flatten(), FirstCoordinates(5)), 10)


def test_the_fingerprint_lists_every_tensor_and_names_the_first_difference():
    a = architecture(own_network(small, TrainConfig()))
    assert a["class"] == "Sequential" and a["tensors"][:3] == [
        "0.mean (1, 3, 1, 1)",
        "1.1.weight (16, 3072)",
        "1.1.bias (16,)",
    ]
    assert len(a["tensors"]) == 5 and architecture_difference(a, a) is None
    wider = architecture(
        own_network(
            lambda c: nn.Sequential(nn.Flatten(), nn.Linear(3072, 17), nn.Linear(17, 10)), TrainConfig()
        )
    )
    assert architecture_difference(a, wider) == "tensor 1 '1.1.weight (16, 3072)' where this network has " + (
        "'1.1.weight (17, 3072)'"
    )
    fewer = {"class": a["class"], "tensors": a["tensors"][:4]}
    assert "5 parameters and buffers where this network has 4" in architecture_difference(a, fewer)
    other = {**a, "class": "MyNet"}
    assert "'Sequential'" in architecture_difference(a, other) and "'MyNet'" in architecture_difference(
        a, other
    )
    assert network_label(cpl_network("XS")) == "CPL-XS" and network_label(nn.Linear(2, 2)) == "Linear"


def test_import_factory_from_the_users_code(tmp_path, monkeypatch):
    (tmp_path / "lab_nets.py").write_text(
        "import torch.nn as nn\n"
        "WIDTH = 3\n"
        "def make_net(config):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3072, config.num_classes))\n"
        "class Zoo:\n"
        "    @staticmethod\n"
        "    def tiny(config):\n"
        "        return make_net(config)\n"
    )
    (tmp_path / "broken_nets.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    factory = import_factory("lab_nets:make_net")
    assert factory.__name__ == "make_net" and isinstance(factory(TrainConfig()), nn.Sequential)
    assert import_factory("lab_nets:Zoo.tiny").__name__ == "tiny"
    for spec, match in [
        ("no_such_module_here:make_net", "no module 'no_such_module_here' on the Python path"),
        ("lab_nets:make_nets", "has no 'make_nets'"),
        ("lab_nets:WIDTH", "is a int, not a function"),
        ("lab_nets.make_net", "MODULE:FUNCTION"),
    ]:
        with pytest.raises(ValueError, match=match):
            import_factory(spec)
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
        import_factory("broken_nets:make_net")  # the user's own import error is not disguised


def test_a_bound_of_the_wrapped_network_is_the_product():
    torch.manual_seed(1)
    lin = nn.Linear(3072, 10, bias=False)
    run_net = own_network(
        nn.Sequential(nn.Flatten(), lin),
        TrainConfig(std_normalize=True),
        torch.zeros(3),
        torch.full((3,), 0.5),
    )
    sigma = torch.linalg.matrix_norm(lin.weight.detach().double(), ord=2).item()
    bound = check_certifiable(run_net, 10)
    assert Fraction(bound) >= 2 * Fraction(sigma) and bound == pytest.approx(2 * sigma, rel=1e-6)
