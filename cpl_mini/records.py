"""A run's record, ``results.json``, read back and summarised.

:func:`cpl_mini.train.train` writes the record of a run (status, configuration, per-epoch history,
final accuracies, machine, versions; :func:`cpl_mini.runs.write_results`). :func:`read_results` reads
it in this version's form (:func:`upgrade_record` converts the records of earlier versions) and
:func:`run_summary` gives the numbers a table of runs shows, as the book's chapters and its teaching
page print them.
"""

import json
import os
import pathlib
import re
import statistics
from typing import Any, Dict, Optional, Union

__all__ = ["read_results", "upgrade_record", "run_summary"]

PathLike = Union[str, os.PathLike]


def read_results(path: PathLike) -> Optional[Dict[str, Any]]:
    """A run's record (:func:`upgrade_record`: in this version's form), or ``None`` when the file is
    missing or unreadable."""
    try:
        record = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return None
    return upgrade_record(record) if isinstance(record, dict) else None


_OLD_CERT_KEY = re.compile(r"cert_(\d+)")


def _upgrade_entry(entry: Any) -> Any:
    if not isinstance(entry, dict):
        return entry
    out, certified = {}, dict(entry.get("certified") or {})
    for key, value in entry.items():
        match = _OLD_CERT_KEY.fullmatch(key)
        if match:
            certified.setdefault(f"{match.group(1)}/255", value)
        elif key != "certified":
            out[key] = value
    if certified:
        out["certified"] = certified
    return out


def upgrade_record(record: Dict[str, Any]) -> Dict[str, Any]:
    """A ``results.json`` record in this version's form (a new dict; ``record`` is not changed).

    Earlier versions keyed the certified accuracies of each history entry and of ``final`` as
    ``cert_36``, ``cert_72``, ``cert_108`` (the radius times 255); they become
    ``certified = {"36/255": ..., "72/255": ..., "108/255": ...}``, the keys files use for radii
    (Python dicts, such as :func:`cpl_mini.certify.certified_accuracy`'s, use the float radii).
    """
    out = dict(record)
    if isinstance(out.get("history"), list):
        out["history"] = [_upgrade_entry(h) for h in out["history"]]
    if out.get("final") is not None:
        out["final"] = _upgrade_entry(out["final"])
    return out


def run_summary(record: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers a table of finished runs shows, from a record of :func:`read_results`.

    Returns ``network`` (``"CPL-S"``), ``params_m`` (millions of parameters), ``epochs``, ``machine``,
    ``path`` (``"compiled"`` or ``"eager"``, then the autocast dtype when the record names it),
    ``epoch_min`` (the median training epoch, minutes), ``minutes`` (the wall time: every epoch,
    evaluations included), ``clean`` and one ``cert<n>`` per radius ``"<n>/255"`` (percent).
    """
    decision = record.get("compile", record["config"].get("compile"))  # the decision, or the setting
    compiled = decision["compiled"] if isinstance(decision, dict) else decision in (True, "on")
    dtype = record.get("autocast")
    dtype_text = {"off": ", float32", None: ""}.get(dtype, f", {dtype}")  # older records name no dtype
    final = record["final"]
    summary = {
        "network": f"CPL-{record['config']['size']}",
        "params_m": record["parameters"] / 1e6,
        "epochs": record["epochs_completed"],
        "machine": record["device"],
        "path": ("compiled" if compiled else "eager") + dtype_text,
        "epoch_min": statistics.median(h["train_seconds"] for h in record["history"]) / 60,
        "minutes": record["wall_time_s"] / 60,
        "clean": 100 * final["clean_acc"],
    }
    for label, accuracy in final["certified"].items():
        summary[f"cert{label.split('/')[0]}"] = 100 * accuracy
    return summary
