"""The reproduction driver at CI size: teachers, three methods, the results table, skip-on-rerun."""

import json

from demkd_jax import reproduce
from conftest import TINY_CLASSES as NUM_CLASSES


def test_reproduce_tiny(tiny_data, tmp_path, capsys):
    argv = ["--pair", "resnet8-resnet8", "--workdir", str(tmp_path / "repro"), "--epochs", "1", "--width", "0.25",
            "--teachers", "2", "--seeds", "2", "--batch-size", "16", "--methods", "CE,AVER,DE-MKD",
            "--data-source", "npz", "--data-path", str(tiny_data), "--data-name", "tiny",
            "--num-classes", str(NUM_CLASSES), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert reproduce.main(argv) == 0
    results = json.loads((tmp_path / "repro" / "results.json").read_text())
    assert [r["method"] for r in results["students"]] == ["CE", "AVER", "DE-MKD"]
    assert len(results["teachers"]["test_acc"]) == 2 and results["teachers"]["ensemble_test_acc"] is not None
    for row in results["students"]:
        assert len(row["best_test_acc"]) == 2, "two seeds per method"
        assert 0.0 <= row["best_test_acc_mean"] <= 100.0
    table = (tmp_path / "repro" / "results.md").read_text()
    assert "| DE-MKD |" in table and "±" in table
    capsys.readouterr()
    # A rerun trains nothing: every piece is found finished.
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    assert "reusing" in out and "initial compilation" not in out
    assert json.loads((tmp_path / "repro" / "results.json").read_text())["students"] == results["students"]
