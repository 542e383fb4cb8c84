"""The command line of ``python -m cpl_mini.train``, generated from the fields of :class:`TrainConfig`.

Each field becomes one option (``batch_size`` -> ``--batch-size``) with its help, choices and default
from the field's metadata; booleans are ``--name/--no-name`` pairs, the auto/on/off settings take
``auto``, ``on`` or ``off`` (``true``/``false`` too). Adding a field to :class:`TrainConfig` adds its
option; nothing here needs to change. Values are checked by :class:`TrainConfig` itself (``--size``
takes a name or ``20,7,45,2048``, ``(20, 7, 45, 2048)``, ``20x7x45x2048``; ``--model`` a
``MODULE:FUNCTION``): a bad one is a one-line error, exit status 2.
"""

import argparse
import dataclasses
import typing
from typing import Optional, Sequence, Tuple

from .runs import TrainConfig

__all__ = ["DESCRIPTION", "build_parser", "parse_train_args"]

DESCRIPTION = """\
Train a CPL network (a 1-Lipschitz network of Convex Potential Layers) on CIFAR-10 or CIFAR-100 with
the paper's recipe: Adam, the piecewise-linear learning-rate schedule, the multi-class hinge loss,
random reflect-padded crops and flips.

After every epoch the run folder (--out) receives checkpoint.pt and results.json, with the clean
accuracy and the accuracy certified at l2 radii 36/255, 72/255 and 108/255 (sound norms, float32).
Running the same command again continues an interrupted run exactly from its last checkpoint; a
finished run is left as it is. Options marked "identity" must keep their value to continue a run.

Your own network: --model MODULE:FUNCTION names a function config -> nn.Module in your code (e.g.
--model mynets:make_net with mynets.py in the current folder); the run puts the input normalisation in
front of it and refuses it before training when cpl_mini.bounds has no sound bound for one of its parts.

Several processes: torchrun --nproc_per_node=N -m cpl_mini.train [options]."""

EPILOG = "exit status: 0 finished or stopped, 2 bad input, 3 the loss diverged (NaN), 130 interrupted"

_DEFAULT_TEXT = {
    "limit_train": "all",
    "limit_test": "all",
    "threads": "PyTorch's choice",
    "data_root": "$CPL_MINI_DATA, then the user cache",
    "model": "none, the CPL network of --size",
}

_METAVAR = {"out": "DIR", "data_root": "DIR", "size": "NAME|D,DL,C,F", "model": "MODULE:FUNCTION"}


class _Switch(argparse.BooleanOptionalAction):
    """``--name/--no-name``; the help is kept as written (some Python versions append the default)."""

    def __init__(self, *args, help=None, **kwargs):
        super().__init__(*args, help=help, **kwargs)
        self.help = help


def _setting(text: str) -> str:
    value = text.strip().lower()
    aliases = {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off", "0": "off"}
    return aliases.get(value, value)


def _value_type(annotation):
    """``Optional[int]`` -> ``int``; plain types unchanged."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def build_parser() -> argparse.ArgumentParser:
    """The parser: one option per :class:`TrainConfig` field, plus ``--progress/--no-progress``."""
    parser = argparse.ArgumentParser(
        prog="python -m cpl_mini.train",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        meta, default = field.metadata, getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        shown = _DEFAULT_TEXT.get(field.name, default)
        if isinstance(default, bool):
            shown = flag[2:] if default else "no-" + flag[2:]
        help_text = meta["help"] + f" (default: {shown})" + ("; identity" if meta.get("identity") else "")
        kind = _value_type(hints[field.name])
        if kind is bool:
            parser.add_argument(flag, action=_Switch, default=default, help=help_text)
        elif meta.get("choices"):
            convert = _setting if meta.get("kind") == "switch" else str
            bare = {"nargs": "?", "const": "on"} if meta.get("kind") == "switch" else {}  # --compile: on
            parser.add_argument(
                flag, type=convert, choices=meta["choices"], default=default, help=help_text, **bare
            )
        else:
            metavar = {int: "N", float: "X"}.get(kind, _METAVAR.get(field.name, "TEXT"))
            parser.add_argument(flag, type=kind, default=default, metavar=metavar, help=help_text)
    parser.add_argument(
        "--progress", action=_Switch, default=True, help="show progress bars (default: progress)"
    )
    return parser


def parse_train_args(argv: Optional[Sequence[str]] = None) -> Tuple[TrainConfig, bool]:
    """``(config, progress)`` from the command line; a bad value exits with status 2 and one line."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    progress = args.pop("progress")
    try:
        config = TrainConfig(**args)
    except ValueError as exc:
        parser.error(str(exc))
    return config, progress
