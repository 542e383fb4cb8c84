r"""Your own network in the training pipeline: the run's network around it, the check that it can be
certified, its architecture's fingerprint, a factory named on the command line.

:func:`cpl_mini.train.train` takes ``model=``: a factory ``model(config) -> nn.Module`` (preferred: it is
called after ``torch.manual_seed(config.seed)``, so the initialisation is reproducible and an exact
resume rebuilds it) or an ``nn.Module`` instance. The run trains :func:`own_network`'s

.. math::  f(u) = g\bigl((u - \mu) / \sigma\bigr), \qquad u \in [0, 1]^{3 \times 32 \times 32},

``nn.Sequential(InputNormalization(mean, std), net)``: the same convention as the CPL networks of
:func:`cpl_mini.runs.run_network`, so the trained model takes raw ``[0, 1]`` pixels ``(N, 3, 32, 32)``,
gives ``(N, num_classes)`` logits, and its certificate includes the normalisation (``sigma`` only with
``std_normalize``). ``net`` sees normalised pictures.

Before a run starts, :func:`check_certifiable` makes sure the pipeline can certify it: the logits'
shape, and :func:`cpl_mini.bounds.lipschitz_upper_bound` knowing a sound bound for every part (the
protocol for your own modules is in ``cpl_mini.bounds``). Checkpoints record the architecture
(:func:`architecture`: the class name and the names and shapes of all parameters and buffers); loading a
checkpoint into another architecture is refused, naming the first difference
(:func:`architecture_difference`). A checkpoint never names code to import: :func:`import_factory` is
only called on a ``MODULE:FUNCTION`` that the user's own command line gives.
"""

import importlib
import re
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .bounds import lipschitz_upper_bound
from .normalization import InputNormalization

__all__ = [
    "MODEL_SPEC",
    "own_network",
    "network_label",
    "check_certifiable",
    "architecture",
    "architecture_difference",
    "import_factory",
]

#: ``MODULE:FUNCTION`` (dotted names both), e.g. ``mynets:make_net`` or ``lab.nets:Nets.small``.
MODEL_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

ModelArg = Union[nn.Module, Callable[[Any], nn.Module]]


def own_network(
    model: ModelArg,
    config: Any,
    mean: Optional[torch.Tensor] = None,
    std: Optional[torch.Tensor] = None,
) -> nn.Sequential:
    """The network of a run of your own ``model``: ``nn.Sequential(InputNormalization(mean, std), net)``.

    ``model``: an ``nn.Module`` (used as it is) or a factory called as ``model(config)``. ``mean``,
    ``std``: the per-channel statistics (3 values each) of the training pictures, ``std`` only used with
    ``config.std_normalize``; placeholders when omitted (a checkpoint's ``state_dict`` overwrites
    them). The result carries ``.config``: ``network`` (``"custom (ClassName)"``), ``class``,
    ``num_classes``, ``input_normalization``.
    """
    if isinstance(model, nn.Module):
        net = model
    elif callable(model):
        net = model(config)
        if not isinstance(net, nn.Module):
            name = getattr(model, "__name__", type(model).__name__)
            raise ValueError(f"the model factory {name} returned a {type(net).__name__}, not an nn.Module")
    else:
        raise ValueError(
            f"model must be an nn.Module or a function config -> nn.Module, got a {type(model).__name__}"
        )
    mean = torch.zeros(3) if mean is None else mean
    std = (torch.ones(3) if std is None else std) if config.std_normalize else None
    wrapped = nn.Sequential(InputNormalization(mean, std), net)
    name = type(net).__name__
    wrapped.config = {
        "network": f"custom ({name})",
        "class": name,
        "num_classes": config.num_classes,
        "input_normalization": "mean" if std is None else "mean_std",
    }
    return wrapped


def network_label(model: nn.Module) -> str:
    """``"CPL-S"`` (a :func:`~cpl_mini.models.cpl_network`), ``"custom (ClassName)"`` (:func:`own_network`)
    or the class name of any other module."""
    config = getattr(model, "config", None) or {}
    if "network" in config:
        return config["network"]
    return f"CPL-{config['size']}" if "size" in config else type(model).__name__


def _first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__


def check_certifiable(
    model: nn.Module, num_classes: int, input_shape: Tuple[int, ...] = (3, 32, 32)
) -> float:
    """Check once, before training, that the pipeline can certify ``model``; returns its bound.

    In evaluation mode (the mode is restored): a batch of 2 zero pictures ``(2, *input_shape)`` must give
    ``(2, num_classes)`` logits, and :func:`~cpl_mini.bounds.lipschitz_upper_bound` must know a sound
    bound of every part. Otherwise ``ValueError`` in one line: the shapes, or the part without a bound
    and the protocol of ``cpl_mini.bounds`` to give it one.
    """
    was_training = model.training
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, device=device))
        if not torch.is_tensor(out) or tuple(out.shape) != (2, num_classes):
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise ValueError(
                f"your network maps a batch of 2 pictures {(2, *input_shape)} to {got}; the run needs "
                f"logits of shape (2, {num_classes})"
            )
        try:
            return lipschitz_upper_bound(model, input_shape=tuple(input_shape))
        except TypeError as exc:
            why = _first_line(exc)
            if "cpl_mini.bounds" not in why:
                why += " (the protocol for your own modules: cpl_mini.bounds)"
            raise ValueError(f"this network cannot be certified, so it is not trained: {why}") from None
    finally:
        model.train(was_training)


def architecture(model: nn.Module) -> Dict[str, Any]:
    """The architecture's fingerprint: ``{"class": name, "tensors": ["name (shape)", ...]}``.

    ``class`` is ``model.config["class"]`` (your network's class, :func:`own_network`) or the class of
    ``model``; ``tensors`` lists every entry of ``model.state_dict()`` (parameters and buffers) in order,
    e.g. ``"1.0.weight (16, 3, 3, 3)"``.
    """
    config = getattr(model, "config", None) or {}
    tensors = [f"{name} {tuple(value.shape)}" for name, value in model.state_dict().items()]
    return {"class": config.get("class", type(model).__name__), "tensors": tensors}


def architecture_difference(saved: Dict[str, Any], have: Dict[str, Any]) -> Optional[str]:
    """The first difference between two :func:`architecture` fingerprints, in words; ``None`` if equal."""
    if saved.get("class") != have.get("class"):
        return f"the class {saved.get('class')!r} where this network is a {have.get('class')!r}"
    old, new = list(saved.get("tensors", [])), list(have.get("tensors", []))
    for i, (a, b) in enumerate(zip(old, new)):
        if a != b:
            return f"tensor {i} {a!r} where this network has {b!r}"
    if len(old) != len(new):
        extra: List[str] = old[len(new) :] or new[len(old) :]
        return (
            f"{len(old)} parameters and buffers where this network has {len(new)} (first unmatched: "
            f"{extra[0]!r})"
        )
    return None


def import_factory(spec: str) -> Callable[[Any], nn.Module]:
    """The factory ``MODULE:FUNCTION`` names (``"mynets:make_net"``), imported from the Python path.

    Only for names the user gives (the command line's ``--model``): never call it on text read from a
    checkpoint or a record. ``ValueError`` in one line when the form is wrong, the module is not on the
    path or has no such callable; errors raised by the module's own code go on unchanged.
    """
    if not isinstance(spec, str) or not MODEL_SPEC.fullmatch(spec):
        raise ValueError(f"--model must be MODULE:FUNCTION, e.g. mynets:make_net, got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        parts = module_name.split(".")
        if exc.name not in {".".join(parts[: i + 1]) for i in range(len(parts))}:
            raise  # the module exists, one of its own imports is missing
        raise ValueError(
            f"--model {spec}: no module {module_name!r} on the Python path; run from the folder that "
            f"holds {parts[0]}.py or add that folder to PYTHONPATH"
        ) from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"--model {spec}: module {module_name!r} has no {attr!r}")
    if not callable(obj):
        raise ValueError(f"--model {spec}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj
