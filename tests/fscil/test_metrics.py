"""FSCIL metrics on known numbers, and masking of classes not seen yet."""

import math

import pytest
import torch

from visadapt.metrics.fscil import (
    comparison_table_markdown,
    harmonic_mean,
    mask_unseen,
    masked_predictions,
    session_accuracy,
    session_table_markdown,
    summarize_sessions,
)


def test_harmonic_mean_known_values():
    assert harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2)  # 0.5333...
    assert harmonic_mean(0.5, 0.5) == pytest.approx(0.5)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(0.9, None) is None


def test_session_accuracy_base_novel_hm():
    labels = [0, 0, 1, 1, 2, 2, 3, 3]  # 2 base classes (0, 1), 2 novel (2, 3)
    preds = [0, 0, 1, 0, 2, 3, 0, 0]
    r = session_accuracy(preds, labels, num_base_classes=2)
    assert r["acc"] == pytest.approx(4 / 8)
    assert r["base_acc"] == pytest.approx(3 / 4) and r["novel_acc"] == pytest.approx(1 / 4)
    assert r["hm"] == pytest.approx(2 * 0.75 * 0.25 / 1.0)
    assert (r["n"], r["n_base"], r["n_novel"]) == (8, 4, 4)
    base_only = session_accuracy([0, 1], [0, 0], num_base_classes=2)
    assert base_only["novel_acc"] is None and base_only["hm"] is None


def test_average_and_performance_drop():
    sessions = [
        {"session": 0, "num_classes": 6, "acc": 0.90, "base_acc": 0.90, "novel_acc": None, "hm": None},
        {"session": 1, "num_classes": 7, "acc": 0.80, "base_acc": 0.85, "novel_acc": 0.50,
         "hm": harmonic_mean(0.85, 0.5)},
        {"session": 2, "num_classes": 8, "acc": 0.70, "base_acc": 0.75, "novel_acc": 0.55,
         "hm": harmonic_mean(0.75, 0.55)},
    ]
    s = summarize_sessions(sessions)
    assert s["avg_acc"] == pytest.approx(0.8)
    assert s["pd"] == pytest.approx(0.2)
    assert s["base_forgetting"] == pytest.approx(0.15)
    assert s["last_hm"] == pytest.approx(2 * 0.75 * 0.55 / 1.3)
    table = session_table_markdown(sessions, title="m")
    assert "| 1 | 7 | 80.00 | 85.00 | 50.00 | 62.96 |" in table and "average acc 80.00" in table
    assert "| m | 90.00 | 70.00 | 80.00 | 20.00 | 15.00 |" in comparison_table_markdown({"m": sessions})


def test_unseen_classes_are_masked():
    logits = torch.tensor([[1.0, 2.0, 9.0, 0.0],  # class 2 wins unmasked, but only 0 and 1 are seen
                           [5.0, 1.0, 0.0, 7.0]])
    assert masked_predictions(logits, 2).tolist() == [1, 0]
    assert logits.argmax(1).tolist() == [2, 3]
    masked = mask_unseen(logits, [0, 3])
    assert math.isinf(masked[0, 1]) and masked.argmax(1).tolist() == [0, 3]
    assert torch.equal(logits, torch.tensor([[1.0, 2.0, 9.0, 0.0], [5.0, 1.0, 0.0, 7.0]]))  # input untouched
    with pytest.raises(ValueError):
        mask_unseen(logits, 5)
