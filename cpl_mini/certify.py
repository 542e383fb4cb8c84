r"""Certified l2 robustness from the logit margin of a Lipschitz network.

If every logit difference ``f_y - f_j`` is ``K_{yj}``-Lipschitz (l2) and ``f`` is L-Lipschitz, the
prediction ``y`` cannot change within the l2 radius

.. math::  r(x) = \frac{f_y(x) - \max_{j \ne y} f_j(x)}{\sqrt{2}\, L}

(Tsuzuku et al., 2018): ``f_y - f_j = <e_y - e_j, f>`` is ``sqrt(2) L``-Lipschitz. With a row-normalised
head the tighter pairwise radius is ``min_{j != y} (f_y - f_j) / (L_body * ||v_y - v_j||)``.

Every radius here is a proven lower bound of that formula for the logits given: the margins are
formed in float64 and rounded *down* (exact for float32 logits), the denominators rounded *up*, each
quotient rounded down, and the result rounded down to the logits' precision (float64 logits give
float64 radii; float32 or lower give float32). Certification uses the *sound* evaluation-mode norms
(guaranteed upper bounds), never autocast, and IEEE float32 (TF32 off,
:func:`~cpl_mini.ieee_precision`).

Radii are in the pixel scale of ``[0, 1]`` images. One convention names them: in Python a result is
keyed by the float radius (``res["certified"][36 / 255]``); in files and printed tables (the JSON of
``python -m cpl_mini.certify``, a run's ``results.json``) by its text, :func:`eps_label`
(``"36/255"`` for a whole number of grey levels, else a short decimal such as ``"0.1"``).
:func:`parse_eps` reads either spelling back (``parse_eps("36/255") == 36 / 255``), and every function
here that takes radii accepts both.

``python -m cpl_mini.certify RUN_DIR [--eps 36/255 0.5 ...]`` certifies the test set with a run's
checkpoint (``--help`` lists the options and exit statuses).
"""

import argparse
import json
import math
import numbers
import pathlib
import sys
import time
from fractions import Fraction
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .bounds import lipschitz_upper_bound
from .layers import RowNormalizedLinear
from .precision import (
    as_float64,
    cast_down,
    float_down,
    float_up,
    ieee_precision,
    next_down,
    next_up,
    sqrt_up,
    sub_down,
)

__all__ = [
    "DEFAULT_EPS",
    "certified_radius",
    "certified_radius_pairwise",
    "certified_accuracy",
    "network_lipschitz",
    "eps_label",
    "parse_eps",
    "format_table",
    "main",
]

#: The radii reported in the literature on CIFAR-10: 36/255, 72/255, 108/255.
DEFAULT_EPS = (36 / 255, 72 / 255, 108 / 255)

#: Floats just above and just below sqrt(2).
SQRT2_UP = sqrt_up(2)
SQRT2_DOWN = math.nextafter(SQRT2_UP, 0)


def _check(logits, labels):
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def _lipschitz_value(lipschitz) -> float:
    value = float(lipschitz)
    if not value > 0 or math.isinf(value):
        raise ValueError(f"lipschitz must be a positive finite number, got {value}")
    return value


def _radius_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _divide_down(num, den):
    r"""``num / den`` rounded toward ``-inf``; ``den`` a ``(lower, upper)`` pair bracketing the exact
    denominator (numbers or tensors). ``0 / den`` is exactly 0."""
    den_down, den_up = den
    q = torch.where(num >= 0, num / den_up, num / den_down)
    return torch.where(num == 0, torch.zeros_like(q), next_down(q))


def _margin_down(z, labels):
    """``f_y - max_{j != y} f_j`` of float64 logits ``z``, rounded down; shape ``(N,)``."""
    true = z.gather(1, labels[:, None]).squeeze(1)
    other = z.scatter(1, labels[:, None], -math.inf).max(dim=1).values
    return sub_down(true, other)


def certified_radius(logits: torch.Tensor, labels: torch.Tensor, lipschitz: float = 1.0) -> torch.Tensor:
    """Per-example certified l2 radius ``(f_y - max_{j!=y} f_j) / (sqrt(2) L)``, shape ``(N,)``.

    ``logits``: ``(N, K)``; ``labels``: ``(N,)``; ``lipschitz``: a guaranteed bound ``L`` of the
    network's constant. Each radius is the formula's exact value rounded *down* (module docstring),
    in float64 for float64 logits, else float32. A radius ``<= 0`` means the example is misclassified
    (or tied) and certifies nothing.
    """
    _check(logits, labels)
    lip = Fraction(_lipschitz_value(lipschitz))
    z = as_float64(logits)
    margin = _margin_down(z, labels.to(z.device))
    den = (float_down(Fraction(SQRT2_DOWN) * lip), float_up(Fraction(SQRT2_UP) * lip))
    return cast_down(_divide_down(margin, den), _radius_dtype(logits.dtype)).to(logits.device)


def certified_radius_pairwise(
    logits: torch.Tensor, labels: torch.Tensor, pairwise_lipschitz: torch.Tensor, lipschitz: float = 1.0
) -> torch.Tensor:
    """Per-example radius ``min_{j != y} (f_y - f_j) / (L * K_{yj})`` for a head with pairwise constants.

    ``pairwise_lipschitz``: ``(K, K)`` matrix with ``K_{yj}`` a guaranteed bound of the Lipschitz
    constant of ``f_y - f_j`` with respect to the head's input (e.g.
    :meth:`RowNormalizedLinear.pairwise_lipschitz`); ``lipschitz``: the bound ``L`` of the body (the
    network before the head). Rounded down as :func:`certified_radius`, same dtypes. Where
    ``K_{yj} = 0`` the difference is constant: it never changes sign (radius ``inf`` if positive).
    """
    _check(logits, labels)
    lip = _lipschitz_value(lipschitz)
    z = as_float64(logits)
    labels = labels.to(z.device)
    k = pairwise_lipschitz.detach().to(device=z.device, dtype=torch.float64)
    if k.shape != (z.shape[1], z.shape[1]):
        raise ValueError(
            f"pairwise_lipschitz must have shape ({z.shape[1]}, {z.shape[1]}), got {tuple(k.shape)}"
        )
    diff = sub_down(z.gather(1, labels[:, None]).expand_as(z), z)  # (N, K): f_y - f_j, rounded down
    scale = k[labels] * lip  # (N, K)
    ratio = _divide_down(diff, (torch.where(scale > 0, next_down(scale), scale), next_up(scale)))
    ratio = ratio.scatter(1, labels[:, None], math.inf)
    return cast_down(ratio.min(dim=1).values, _radius_dtype(logits.dtype)).to(logits.device)


def network_lipschitz(
    model: nn.Module, input_lipschitz: float = 1.0, input_shape: Optional[Sequence[int]] = None
) -> Tuple[float, Optional[torch.Tensor]]:
    """``(L, pairwise)``: a guaranteed bound of the network's l2 Lipschitz constant and, for a
    row-normalised head, the pairwise matrix of its logit differences (else ``None``; then ``L`` is the
    bound of the body, the network without its head).

    ``input_lipschitz`` is the constant of an input normalisation outside the model (``1/min(std)``
    when dividing by std). ``input_shape``: one input's shape without the batch dimension, ``(C, H, W)``,
    which gives plain ``nn.Conv2d`` layers their tight bound (see ``lipschitz_upper_bound``). The model
    must be in evaluation mode (``ValueError`` otherwise).
    """
    shape = None if input_shape is None else tuple(input_shape)
    with ieee_precision():
        if isinstance(model, nn.Sequential) and isinstance(model[-1], RowNormalizedLinear):
            body = lipschitz_upper_bound(model[:-1], input_shape=shape)
            pairwise = model[-1].pairwise_lipschitz()
        else:
            body, pairwise = lipschitz_upper_bound(model, input_shape=shape), None
    return float_up(Fraction(body) * Fraction(float(input_lipschitz))), pairwise


def _batches(data, batch_size, device, dtype):
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        x_all, y_all = data
        for i in range(0, len(x_all), batch_size):
            yield x_all[i : i + batch_size].to(device, dtype), y_all[i : i + batch_size].to(device)
    else:
        for x, y in data:
            yield x.to(device, dtype), y.to(device)


def _model_dtype_device(model, device):
    params = [p for p in model.parameters() if p.is_floating_point()]
    low = sorted({str(p.dtype) for p in params if p.dtype not in (torch.float32, torch.float64)})
    if low:
        raise ValueError(
            f"certified_accuracy certifies in float32 or float64, but the model has "
            f"{', '.join(low)} parameters; certify a float32 copy "
            "(copy.deepcopy(model).float()): the network certified is then that copy"
        )
    dtype = torch.float64 if params and all(p.dtype == torch.float64 for p in params) else torch.float32
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    return dtype, torch.device(device)


_EPS_HELP = "a number >= 0 such as 0.1, or a fraction of the pixel scale such as 36/255"


def parse_eps(value: Union[str, float, torch.Tensor]) -> float:
    """A radius from a number or its text: ``0.1``, ``"0.1"``, ``"36/255"``, ``" 36 / 255 "``.

    ``"k/d"`` gives ``k / d`` in float64 arithmetic, so ``parse_eps("36/255") == 36 / 255``, and
    ``parse_eps(eps_label(e)) == e`` for the radii ``k/255`` and for every other float (labelled by its
    ``repr``) but those within ``1e-9 / 255`` of some ``k/255``, which read back as ``k/255``.
    ``ValueError`` for anything else, and for radii that are negative or NaN.

    Examples:
        >>> parse_eps("36/255") == 36 / 255, parse_eps(" 0.1 "), parse_eps(1)
        (True, 0.1, 1.0)
    """
    if isinstance(value, str):
        eps = _parse_eps_text(value)
    elif torch.is_tensor(value) and value.numel() == 1 and not value.dtype.is_complex:
        eps = float(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        eps = float(value)
    else:
        raise ValueError(f"eps must be {_EPS_HELP}, got {value!r} of type {type(value).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps must be {_EPS_HELP}, got {value!r}: a radius is >= 0")
    return eps


def _parse_eps_text(text: str) -> float:
    num, slash, den = text.strip().partition("/")
    try:
        eps = float(num) / float(den) if slash else float(num)
        if slash and not 0 < float(den) < math.inf:
            raise ValueError
    except (ValueError, ZeroDivisionError, OverflowError):
        raise ValueError(f"eps must be {_EPS_HELP}, got {text!r}") from None
    return eps


def eps_label(eps: float) -> str:
    """The text of a radius in files and tables: ``"36/255"`` when ``255 * eps`` is within ``1e-9`` of
    a whole number ``k >= 1``, else the shortest decimal that reads back as ``eps`` (``"0.1"``, ``"0"``).

    Examples:
        >>> eps_label(36 / 255), eps_label(0.1), eps_label(0.0), eps_label("72/255")
        ('36/255', '0.1', '0', '72/255')
    """
    eps = parse_eps(eps)
    k = round(eps * 255) if eps < 1e6 else 0
    if k >= 1 and abs(eps * 255 - k) <= 1e-9:
        return f"{k}/255"
    return "0" if eps == 0 else repr(eps)


def _eps_tuple(eps) -> Tuple[float, ...]:
    single = isinstance(eps, (str, numbers.Real)) or (torch.is_tensor(eps) and eps.dim() == 0)
    if single:
        return (parse_eps(eps),)
    try:
        values = list(eps)
    except TypeError:
        raise ValueError(
            f"eps must be one radius or an iterable of radii ({_EPS_HELP}), got {eps!r}"
        ) from None
    return tuple(parse_eps(e) for e in values)


@torch.no_grad()
def certified_accuracy(
    model: nn.Module,
    data: Any,
    eps: Union[float, str, Iterable[Union[float, str]]] = DEFAULT_EPS,
    input_lipschitz: Optional[float] = None,
    batch_size: int = 500,
    device: Union[str, torch.device, None] = None,
) -> Dict[str, Any]:
    """Clean accuracy, certified accuracy at each ``eps`` and all radii, with sound bounds.

    Args:
        model: a network in the package's pieces (``lipschitz_upper_bound`` must know it), with float32
            or float64 parameters (lower precisions are refused: certify a float32 copy).
        data: an iterable of ``(x, y)`` batches (e.g. :class:`cpl_mini.loader.DeviceLoader`) or a
            pair of tensors ``(inputs, labels)``; inputs already normalised as the model expects.
        eps: one l2 radius or several, in the input's pixel scale ([0, 1] images): floats or their
            text (``"36/255"``, ``"0.1"``; :func:`parse_eps`).
        input_lipschitz: Lipschitz constant of the normalisation from pixels to the model's input;
            default: ``data.lipschitz_factor`` when the loader has it, else 1.
    Returns:
        dict with ``accuracy`` (``argmax == label``), ``certified`` (``{eps: fraction}``, keyed by the
        float radii whichever spelling was given: correct with radius ``> eps``), ``radii`` (``(N,)``
        tensor on the CPU, float32, float64 for a float64 model; ``<= 0`` for misclassified or tied
        examples), ``lipschitz`` (the bound used), ``n``.

    The forward pass runs in evaluation mode (the model's mode is restored afterwards), in the
    parameters' dtype, without autocast and with TF32 off.

    Examples:
        >>> import torch, torch.nn as nn
        >>> from cpl_mini import ConvexPotentialLinear, FirstCoordinates, certified_accuracy
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(ConvexPotentialLinear(4), FirstCoordinates(2)).eval()
        >>> x = torch.randn(100, 4)
        >>> y = net(x).argmax(1)  # labels the network gets right
        >>> res = certified_accuracy(net, (x, y), eps=0.01)
        >>> res["accuracy"], res["lipschitz"], res["n"]
        (1.0, 1.0, 100)
        >>> res["certified"][0.01] == (res["radii"] > 0.01).float().mean().item()
        True
    """
    eps = _eps_tuple(eps)
    if input_lipschitz is None:
        input_lipschitz = float(getattr(data, "lipschitz_factor", 1.0))
    dtype, device = _model_dtype_device(model, device)
    was_training = model.training
    model.eval()
    radii, correct = [], []
    try:
        lip = pairwise = None
        with torch.autocast(device.type, enabled=False), ieee_precision():
            for x, y in _batches(data, batch_size, device, dtype):
                if lip is None:  # the first batch gives the input shape (tight bounds of plain convolutions)
                    lip, pairwise = network_lipschitz(model, input_lipschitz, x.shape[1:])
                logits = model(x)
                if pairwise is None:
                    r = certified_radius(logits, y, lip)
                else:
                    r = certified_radius_pairwise(logits, y, pairwise, lip)
                radii.append(r.cpu())
                correct.append((logits.argmax(1) == y).cpu())
        if lip is None:  # no data: the bound alone
            lip, pairwise = network_lipschitz(model, input_lipschitz)
    finally:
        model.train(was_training)
    radii = torch.cat(radii) if radii else torch.zeros(0, dtype=_radius_dtype(dtype))
    correct = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    n = radii.numel()
    exact = radii.double()  # compare with eps exactly: radii are rounded down, eps is a float64 number
    return {
        "accuracy": correct.double().mean().item() if n else float("nan"),
        "certified": {e: ((exact > e) & correct).double().mean().item() if n else float("nan") for e in eps},
        "radii": radii,
        "lipschitz": lip,
        "n": n,
    }


def format_table(result: Dict[str, Any]) -> str:
    """A small text table of a :func:`certified_accuracy` result, radii named by :func:`eps_label`."""
    labels = [eps_label(e) for e in result["certified"]]
    width = max([10, *map(len, labels)])
    lines = [
        f"{'eps':>{width}} | {'certified accuracy':>18}",
        "-" * (width + 21),
        f"{'clean':>{width}} | {100 * result['accuracy']:17.2f}%",
    ]
    for label, acc in zip(labels, result["certified"].values()):
        lines.append(f"{label:>{width}} | {100 * acc:17.2f}%")
    return "\n".join(lines)


# -- the command line ------------------------------------------------------------------------------------
_EPILOG = (
    "exit status: 0 certified, 2 bad input (no run folder or checkpoint, a corrupt checkpoint, "
    "missing or damaged data, a bad value), 130 interrupted"
)


class _OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``error: ...``, with exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class _Switch(argparse.BooleanOptionalAction):
    """``--name/--no-name`` with the help kept as written (Python < 3.12 appends the default)."""

    def __init__(self, *args, help=None, **kwargs):
        super().__init__(*args, help=help, **kwargs)
        self.help = help


def _eps_argument(text: str) -> float:
    try:
        return parse_eps(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m cpl_mini.certify``."""
    parser = _OneLineParser(
        prog="python -m cpl_mini.certify",
        description="Certified l2 accuracy of a trained run on its test set, with sound bounds "
        "(evaluation-mode norms, IEEE float32). The radii are in the pixel scale of [0, 1] images.",
        epilog=_EPILOG,
    )
    parser.add_argument(
        "run_dir",
        type=pathlib.Path,
        metavar="RUN_DIR",
        help="a folder written by python -m cpl_mini.train --out RUN_DIR (it holds checkpoint.pt)",
    )
    parser.add_argument(
        "--eps",
        nargs="+",
        type=_eps_argument,
        default=list(DEFAULT_EPS),
        metavar="EPS",
        help="l2 radii to certify, as fractions (36/255) or decimals (0.1) (default: 36/255 72/255 108/255)",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        metavar="DIR",
        help="folder holding the CIFAR archive "
        "(default: the run's, then $CPL_MINI_DATA, then the user cache)",
    )
    parser.add_argument(
        "--download",
        action=_Switch,
        default=True,
        help="download the official archive when it is missing (default: download)",
    )
    parser.add_argument(
        "--limit-test",
        type=_positive_int,
        default=None,
        metavar="N",
        help="certify only the first N test images (default: the run's own limit)",
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="MODULE:FUNCTION",
        help="the factory of your own network, as given to python -m cpl_mini.train --model "
        "(a checkpoint never names code to import) (default: none, a CPL network)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, ... (default: auto)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the result as one line of JSON, radii keyed as 36/255 (default: a table)",
    )
    return parser


def _certify_run(args) -> Tuple[Dict[str, Any], Any]:
    """Load the run of ``args.run_dir`` and its test set, then certify; input errors propagate."""
    from .cifar import load_cifar
    from .custom import import_factory
    from .runs import CheckpointError, TrainConfig, load_checkpoint, load_run_model, resolve_device

    device = resolve_device(args.device)  # before anything is loaded: a bad device fails at once
    if not args.run_dir.is_dir():
        raise FileNotFoundError(
            f"no run folder {args.run_dir}: give a folder written by python -m cpl_mini.train --out DIR"
        )
    path = args.run_dir / "checkpoint.pt"
    saved = load_checkpoint(path).get("config")  # to know the data set before loading it
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} holds no run configuration: it was not written by cpl_mini.train")
    config = TrainConfig.from_dict(saved)
    data = load_cifar(config.dataset, root=args.data_root or config.data_root, download=args.download)
    factory = import_factory(args.model) if args.model else None  # only from the user's command line
    model, loader, config = load_run_model(
        args.run_dir, device=device, limit_test=args.limit_test, data=data, model=factory
    )
    return certified_accuracy(model, loader, eps=args.eps), config


def _input_errors() -> Tuple[type, ...]:
    import pickle

    from .runs import CheckpointError

    # FileNotFoundError and other OSErrors, ValueError (CorruptArchiveError too), UnsafePickleError
    return (CheckpointError, OSError, ValueError, pickle.UnpicklingError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cpl_mini.certify RUN_DIR``: certify the test set with a run's checkpoint.

    Exit status 0 when certified, 2 on bad input (one line ``error: ...`` on stderr, no traceback),
    130 when interrupted.
    """
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        result, config = _certify_run(args)
    except KeyboardInterrupt:
        print("interrupted: nothing was written; run the same command again", file=sys.stderr)
        return 130
    except _input_errors() as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    seconds = time.time() - start
    if args.json:
        record = {
            "accuracy": result["accuracy"],
            "certified": {eps_label(e): v for e, v in result["certified"].items()},
            "n": result["n"],
            "lipschitz": result["lipschitz"],
            "seconds": seconds,
        }
        print(json.dumps(record))
    else:
        print(
            f"run {args.run_dir} | network {getattr(config, 'size', '?')} | {result['n']} test images | "
            f"Lipschitz bound {result['lipschitz']:.6f} | {seconds:.1f} s"
        )
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
