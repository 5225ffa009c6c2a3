"""The reproduction driver: a tiny 16 px protocol end to end (teachers, three methods, statistics, plots,
skip-on-rerun), and its statistics, tables and configs without training."""

import json

import numpy as np
import pytest

from demkd_jax import config as config_lib
from demkd_jax import methods, reproduce
from conftest import REPO_ROOT as REPO, TINY_CLASSES as NUM_CLASSES

TINY_PROTOCOL = '''
from demkd_jax.reproduce import protocol_template


def get_config():
    p = protocol_template()
    p.name = "tiny"
    p.description = "A CI-sized proxy."
    p.data.update({{"source": "npz", "name": "tiny", "path": {path!r}, "num_classes": {classes}}})
    p.data.downsample = 2  # 16 px, as the CIFAR-100 protocols
    p.data.crop_padding = 2
    p.batch_size = 16
    p.teachers.update({{"model": "resnet8", "num": 2, "epochs": 1, "width": 0.25, "lr_decay_epochs": (1,)}})
    p.students.update({{"model": "resnet8", "epochs": 1, "width": 0.25, "seeds": 2, "data_seeds": (0,),
                       "lr_decay_epochs": (1,), "warmup_epochs": 2, "beta": 2.0}})
    p.methods = ("ce", "aver", "demkd")
    p.baselines = ("ce", "aver")
    p.positive_control = ()
    p.gates.distill_over_ce = 2.0
    return p
'''


def test_reproduce_tiny_protocol(tiny_data, tmp_path, capsys):
    protocol = tmp_path / "tiny_protocol.py"
    protocol.write_text(TINY_PROTOCOL.format(path=str(tiny_data), classes=NUM_CLASSES))
    out = tmp_path / "repro"
    argv = ["--protocol", str(protocol), "--workdir", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--no-progress"]
    assert reproduce.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["methods"]] == ["ce", "aver", "demkd"]
    assert len(results["teachers"]["test_acc"]) == 2 and results["teachers"]["ensemble_test_acc"] is not None
    for m in results["methods"]:
        assert [(r["data_seed"], r["student_seed"]) for r in m["runs"]] == [(0, 0), (0, 1)]
        finals = [r["final_test_acc"] for r in m["runs"]]
        assert m["final"]["mean"] == pytest.approx(np.mean(finals)) and m["final"]["n"] == 2
        assert m["final"]["low"] <= m["final"]["mean"] <= m["final"]["high"]
        assert len(m["curve_mean"]) == 1 and all(len(r["test_acc_per_epoch"]) == 1 for r in m["runs"])
    weights = results["methods"][2]["teacher_weight_per_epoch"]
    assert len(weights) == 1 and len(weights[0]) == 2 and min(weights[0]) > 0  # epoch 1: one mean weight per teacher
    assert [c["b"] for c in results["comparisons"]] == ["ce", "aver"]
    assert len(results["pairwise"]) == 3 and results["gates"][0]["gate"].startswith("every distillation")
    table = (out / "results.md").read_text()
    assert "| DE-MKD | " in table and "## DE-MKD against each baseline" in table and "p (Holm)" in table
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "teacher_weights.png").stat().st_size > 0
    config = json.loads((out / "demkd" / "seed_0" / "config.json").read_text())
    assert config["data"]["downsample"] == 2 and config["distill"]["features"] is True
    capsys.readouterr()
    # A rerun trains nothing: every piece is found finished.
    assert reproduce.main(argv) == 0
    printed = capsys.readouterr().out
    assert "reusing" in printed and "initial compilation" not in printed
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]


def _method(name, finals, bests=None):
    runs = [{"data_seed": d, "student_seed": r, "final_test_acc": f, "best_test_acc": (bests or finals)[i],
             "test_acc_per_epoch": [f - 1.0, f]} for i, ((d, r), f) in enumerate(zip(
                 [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)], finals))]
    return reproduce.method_result(name, runs, [[[1.2, 0.9, 0.9], [1.1, 1.0, 0.9]]], 10.0, 100.0, 0.95)


def test_analysis_holm_verdicts_control_and_tables(tmp_path):
    p = reproduce.protocol_template()
    p.name = "synthetic"
    p.methods = ("kd", "dkd", "aver", "demkd")
    p.baselines = ("kd", "dkd", "aver")
    base = np.array([60.0, 60.4, 59.8, 60.2, 60.1, 59.9])
    methods = [_method("kd", base), _method("dkd", base + [0.9, 1.1, 1.0, 0.8, 1.2, 1.0]),
               _method("aver", base + [1.9, 2.1, 2.0, 1.8, 2.2, 2.0]),
               _method("demkd", base + [2.0, 2.1, 2.0, 2.0, 2.1, 2.1])]
    teachers = {"model": "resnet20", "epochs": 30, "test_acc": [60.0, 61.0], "ensemble_test_acc": 63.0,
                "best_test_acc": [60.0, 61.0], "wall_time_s": 5.0}
    a = reproduce.analyse(p, teachers, methods)
    by = {c["b"]: c for c in a["comparisons"]}
    diffs = np.array([2.0, 2.1, 2.0, 2.0, 2.1, 2.1])
    assert by["kd"]["mean"] == pytest.approx(diffs.mean()) and by["kd"]["n"] == 6
    assert by["kd"]["verdict"] == "wins" and by["dkd"]["verdict"] == "wins"
    # DE-MKD - AVER: +0.05 +- 0.13 at the Holm level of the last of three: its upper bound is below +0.3.
    assert by["aver"]["verdict"] == "does not win" and by["aver"]["high"] < 0.3
    assert sorted(c["confidence"] for c in a["comparisons"]) == pytest.approx([0.95, 1 - 0.05 / 2, 1 - 0.05 / 3])
    assert by["aver"]["confidence"] == pytest.approx(0.95)  # the largest p-value is tested last, at alpha / 1
    p_values = [c["p"] for c in a["comparisons"]]
    assert [c["p_holm"] for c in a["comparisons"]] == pytest.approx(reproduce.stats.holm(p_values)[0])
    assert a["positive_control"]["passes"] and a["positive_control"]["mean"] == pytest.approx(1.0)
    assert len(a["pairwise"]) == 6 and a["gates"] == []
    results = {"protocol": p.to_dict(), "command": "python -m demkd_jax.reproduce --protocol x", "device": "cpu",
               "backend": "cpu", "jax_version": "0", "cpu": "x86_64", "cpu_count": 2, "dataset": "cifar100",
               "teachers": teachers, "methods": methods, "total_wall_time_s": 45.0, **a}
    table = reproduce.results_markdown(results)
    assert "| AVER | +0.05 | [" in table and "**does not win**" in table and "**wins**" in table
    assert "Positive control: DKD (teacher 0) − KD (teacher 0) = +1.00" in table and "**passes**" in table
    assert "| KD (teacher 0) | 60.07 ± 0.22 | [59.84, 60.29] | 6 |" in table  # mean ± sample std of the six finals
    json.dumps(results)  # the JSON output is plain data
    written = reproduce.write_plots(results, tmp_path)
    assert [w.name for w in written] == ["accuracy.png", "teacher_weights.png"]


def test_protocol_files_and_clear_errors():
    for name in ("cifar100_16px_pilot", "cifar100_16px_main"):
        p = reproduce.load_protocol(str(REPO / "configs" / "protocols" / f"{name}.py"))
        reproduce.check_protocol(p)
        assert p.data.downsample == 2 and p.data.crop_padding == 2 and p.students.model == "resnet8"
    p = reproduce.protocol_template()
    p.name = "bad"
    p.methods = ("kd", "dkd_typo")
    with pytest.raises(config_lib.ConfigError, match=r"unknown method\(s\) \['dkd_typo'\]"):
        reproduce.check_protocol(p)
    c = config_lib.base_config()
    with pytest.raises(config_lib.ConfigError, match="method 'x' sets config key 'distill.no_such_key', which this "
                                                     "version of demkd_jax does not have"):
        reproduce.set_config_key(c, "distill.no_such_key", 1, "method 'x'")
    with pytest.raises(config_lib.ConfigError, match="protocol 'p' data sets config key 'data.downsample' to 'two': "
                                                     "downsample must be int, got str"):
        reproduce.set_config_key(c, "data.downsample", "two", "protocol 'p' data")


def test_pair_warmup_scales_to_a_real_warmup():
    # The trainer's factor is min(epoch / warmup, 1) with 1-based epochs: warm-up 1 would be none.
    argv = ["--pair", "resnet14-resnet8", "--workdir", "/tmp/unused", "--epochs", "2", "--scale-warmup"]
    args = reproduce.parse_args(argv)
    p = reproduce.pair_protocol(args)
    dirs = ["t0", "t1", "t2"]
    demkd = reproduce.student_config(p, args, "demkd", 0, dirs)
    assert demkd.distill.warmup_epochs == 2 and min(1 / demkd.distill.warmup_epochs, 1.0) < 1.0
    assert reproduce.student_config(p, args, "kd", 0, dirs).distill.warmup_epochs == -1  # KD has none
    assert tuple(demkd.optim.lr_decay_epochs) == (1, 2, 2)
    assert reproduce.scaled_warmup(20, 120) == 10 and reproduce.scaled_warmup(20, 15) == 2
    unscaled = reproduce.pair_protocol(reproduce.parse_args(argv[:-1]))
    assert methods.resolve(reproduce.student_config(unscaled, args, "demkd", 0, dirs)).warmup_epochs == 20
