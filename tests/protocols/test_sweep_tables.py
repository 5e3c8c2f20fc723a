import json

import pytest

from visadapt.protocols.sweep import Cell, base2novel_table, harmonic_mean, write_tables


def test_harmonic_mean():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_base2novel_average_is_hm_of_averages_not_mean_of_hms():
    cells = {"a": {1: (90.0, 30.0), 2: (80.0, 40.0)},  # seed-averaged: B=85, N=35
             "b": {1: (50.0, 70.0), 2: (60.0, 70.0)}}  # B=55, N=70
    t = base2novel_table(cells)
    assert t["a"]["hm"] == pytest.approx(harmonic_mean(85.0, 35.0))
    # per-dataset HM from seed-AVERAGED accuracies, not the mean of per-seed HMs
    assert t["a"]["hm"] != pytest.approx((harmonic_mean(90, 30) + harmonic_mean(80, 40)) / 2)
    assert t["average"]["base"] == pytest.approx(70.0) and t["average"]["novel"] == pytest.approx(52.5)
    assert t["average"]["hm"] == pytest.approx(harmonic_mean(70.0, 52.5))
    assert t["average"]["hm"] != pytest.approx((t["a"]["hm"] + t["b"]["hm"]) / 2)


def test_fewshot_table_mean_std(tmp_path):
    (tmp_path / "cells").mkdir()
    cells = [Cell("ds", 4, s) for s in (1, 2)]
    for c, acc in zip(cells, (70.0, 74.0)):
        (tmp_path / "cells" / f"{c.name}.json").write_text(json.dumps({"report": {"adapted": {"all": acc}}}))
    t = write_tables(tmp_path, cells, "fewshot")
    assert t["adapted_k4"] == {"ds": pytest.approx(72.0)}
    md = (tmp_path / "table.md").read_text()
    assert "72.00 ± 2.83" in md


def test_transfer_table_averages_targets_not_source(tmp_path):
    (tmp_path / "cells").mkdir()
    cells = [Cell("src", 16, s) for s in (1, 2)]
    reports = [{"zeroshot": {"all": 30.0, "shift": 20.0, "other": 10.0},
                "adapted": {"all": 80.0, "shift": 50.0, "other": 12.0}},
               {"zeroshot": {"all": 30.0, "shift": 20.0, "other": 10.0},
                "adapted": {"all": 70.0, "shift": 40.0, "other": 16.0}}]
    for c, r in zip(cells, reports):
        (tmp_path / "cells" / f"{c.name}.json").write_text(json.dumps({"report": r}))
    t = write_tables(tmp_path, cells, "transfer")
    row = t["adapted_k16_src"]
    assert row["all"] == pytest.approx(75.0) and row["shift"] == pytest.approx(45.0)
    assert row["other"] == pytest.approx(14.0)
    assert row["target_average"] == pytest.approx((45.0 + 14.0) / 2)  # the source column is not averaged in
    assert t["zeroshot_k16_src"]["target_average"] == pytest.approx(15.0)
    md = (tmp_path / "table.md").read_text()
    assert "| adapted | 16 | src | 75.00 ± 7.07 | 45.00 ± 7.07 | 14.00 ± 2.83 | 29.50 |" in md


def test_transfer_table_without_targets_says_how_to_add_them(tmp_path):
    (tmp_path / "cells").mkdir()
    cell = Cell("src", 16, 1)
    (tmp_path / "cells" / f"{cell.name}.json").write_text(json.dumps({"report": {"adapted": {"all": 1.0}}}))
    with pytest.raises(ValueError, match="data.init_args.targets"):
        write_tables(tmp_path, [cell], "transfer")
