"""cpl_mini.records: a run's record read back in this version's form, and summarised for a table."""

import json
import pathlib

import pytest

from cpl_mini.records import read_results, run_summary, upgrade_record

HERE = pathlib.Path(__file__).resolve().parent


# -- records of earlier versions ------------------------------------------------------------------------
def _old_record():
    entry = {"epoch": 1, "loss": 0.5, "clean_acc": 0.4, "cert_36": 0.3, "cert_72": 0.2, "cert_108": 0.1}
    return {
        "status": "finished",
        "history": [{"epoch": 1, "loss": 0.6}, entry],
        "final": {"clean_acc": 0.4, "cert_36": 0.3, "cert_72": 0.2, "cert_108": 0.1},
        "config": {"size": "XS"},
    }


def test_read_results_upgrades_the_cert_keys_of_earlier_versions(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_old_record()))
    record = read_results(path)
    certified = {"36/255": 0.3, "72/255": 0.2, "108/255": 0.1}
    assert record["final"] == {"clean_acc": 0.4, "certified": certified}
    assert record["history"] == [
        {"epoch": 1, "loss": 0.6},
        {"epoch": 1, "loss": 0.5, "clean_acc": 0.4, "certified": certified},
    ]
    assert record["config"] == {"size": "XS"} and record["status"] == "finished"
    assert json.loads(path.read_text()) == _old_record()  # the file itself is left as it is
    assert upgrade_record(record) == record  # a record of this version stays as it is
    assert read_results(tmp_path / "missing.json") is None


def test_the_books_committed_records_still_read():
    for path in sorted((HERE.parent / "book" / "results").glob("*.json")):
        raw, record = json.loads(path.read_text()), read_results(path)
        old = raw["final"].get("cert_36", raw["final"].get("certified", {}).get("36/255"))
        assert record["final"]["certified"]["36/255"] == old, path.name
        assert not any(k.startswith("cert_") for h in record["history"] for k in h), path.name


# -- summaries for tables of runs -----------------------------------------------------------------------
def _record(**changes):
    record = {
        "status": "finished",
        "config": {"size": "S", "compile": "auto"},
        "compile": {"setting": "auto", "compiled": True},
        "autocast": "bfloat16",
        "parameters": 41_342_616,
        "epochs_completed": 3,
        "device": "Some CPU (2 threads)",
        "history": [{"train_seconds": t} for t in (600.0, 300.0, 2400.0)],
        "wall_time_s": 3600.0,
        "final": {"clean_acc": 0.5, "certified": {"36/255": 0.4, "72/255": 0.25, "108/255": 0.125}},
    }
    return {**record, **changes}


def test_run_summary_gives_the_numbers_of_a_table_row():
    assert run_summary(_record()) == {
        "network": "CPL-S",
        "params_m": pytest.approx(41.342616),
        "epochs": 3,
        "machine": "Some CPU (2 threads)",
        "path": "compiled, bfloat16",
        "epoch_min": 10.0,  # the median of 10, 5 and 40 minutes, not their mean
        "minutes": 60.0,
        "clean": 50.0,
        "cert36": 40.0,
        "cert72": 25.0,
        "cert108": 12.5,
    }
    assert run_summary(_record(autocast="off"))["path"] == "compiled, float32"
    assert run_summary(_record(compile={"compiled": False}))["path"] == "eager, bfloat16"


def test_run_summary_reads_records_of_earlier_versions(tmp_path):
    old = _record(config={"size": "CPU", "compile": True})  # the setting only, no decision, no dtype
    del old["compile"], old["autocast"]
    old["final"] = {"clean_acc": 0.5, "cert_36": 0.4}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(old))
    summary = run_summary(read_results(path))
    assert (summary["network"], summary["path"], summary["cert36"]) == ("CPL-CPU", "compiled", 40.0)
    old["config"]["compile"] = "off"
    path.write_text(json.dumps(old))
    assert run_summary(read_results(path))["path"] == "eager"


def test_the_books_committed_runs_summarise():
    for path in sorted((HERE.parent / "book" / "results").glob("*.json")):
        record = read_results(path)
        summary = run_summary(record)
        assert summary["epochs"] == record["epochs_completed"] == len(record["history"]), path.name
        assert 0 < summary["cert108"] < summary["cert72"] < summary["cert36"] < summary["clean"] < 100
