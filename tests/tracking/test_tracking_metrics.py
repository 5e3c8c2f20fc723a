"""Tracking metrics: parity with the got10k toolkit (PyPI) and one pinned test per convention difference."""

from __future__ import annotations

import numpy as np
import pytest

from visadapt.data.tracking.got10k import read_got10k
from visadapt.data.tracking.synthetic import SyntheticConfig, generate
from visadapt.metrics.tracking import (
    CENTER_THRESHOLDS,
    NORM_CENTER_THRESHOLDS,
    OVERLAP_THRESHOLDS,
    PYTRACKING_OVERLAP_THRESHOLDS,
    center_error,
    got10k_metrics,
    iou,
    normalized_center_error,
    ope_metrics,
    sequence_curves,
    sequence_errors,
    success_curve,
)


def _random_track(rng: np.random.Generator, n: int, noise: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    gt = np.column_stack([rng.uniform(0, 200, n), rng.uniform(0, 150, n), rng.uniform(5, 60, n),
                          rng.uniform(5, 60, n)])
    pred = gt + rng.normal(0, noise, (n, 4))
    pred[:, 2:] = np.abs(pred[:, 2:]) + 1
    return pred, gt


# -- parity with the got10k toolkit ----------------------------------------------------------------------------------
def test_ope_matches_got10k_otb_experiment():
    """SUC, P and the curves equal got10k's OTB experiment (its report() aggregation, its metric functions)."""
    metrics = pytest.importorskip("got10k.utils.metrics")
    from got10k.experiments.otb import ExperimentOTB

    exp = ExperimentOTB.__new__(ExperimentOTB)  # the metric methods need no dataset on disk
    exp.nbins_iou, exp.nbins_ce = 21, 51
    rng = np.random.default_rng(0)
    preds, gts = zip(*[_random_track(rng, n) for n in (30, 45, 12, 60)])
    succ, prec = [], []
    for p, g in zip(preds, gts):
        boxes = p.copy()
        boxes[0] = g[0]  # as report() does
        s, c = exp._calc_curves(metrics.rect_iou(boxes, g.copy()), metrics.center_error(boxes, g))
        succ.append(s)
        prec.append(c)
    ref_succ, ref_prec = np.mean(succ, 0), np.mean(prec, 0)
    ours = ope_metrics(list(preds), list(gts), convention="got10k")
    np.testing.assert_allclose(ours["success_curve"], ref_succ, atol=1e-12)
    np.testing.assert_allclose(ours["precision_curve"], ref_prec, atol=1e-12)
    assert abs(ours["SUC"] - float(np.mean(ref_succ))) < 1e-6
    assert abs(ours["P"] - float(ref_prec[20])) < 1e-6
    assert 0.2 < ours["SUC"] < 0.9  # the noise level makes a non-trivial score
    # the per-frame functions agree too
    p, g = preds[0], gts[0]
    np.testing.assert_allclose(iou(p, g), metrics.rect_iou(p.copy(), g.copy()), atol=1e-12)
    np.testing.assert_allclose(center_error(p, g), metrics.center_error(p, g), atol=1e-12)
    bound = (150.0, 120.0)
    np.testing.assert_allclose(iou(p, g, bound=bound), metrics.rect_iou(p.copy(), g.copy(), bound=bound), atol=1e-12)


def test_got10k_metrics_match_toolkit_report_on_generated_folder(tmp_path, monkeypatch):
    """AO / SR0.5 / the 101-bin curve equal ExperimentGOT10k.report() run on a generated GOT-10k folder (so the
    toolkit also reads the generator's format: list.txt, meta_info.ini, the three label files)."""
    pytest.importorskip("got10k")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    from got10k.experiments import ExperimentGOT10k

    root = tmp_path / "synth"
    config = SyntheticConfig(num_frames=32, frame_size=(96, 72), occlusion_prob=1.0, out_of_view_prob=1.0)
    generate(root, "val", 3, seed=3, config=config, progress=False)
    ds = read_got10k(root, "val")
    rng = np.random.default_rng(1)
    results = tmp_path / "results" / "GOT-10k" / "noisy"
    preds = []
    for seq in ds:
        runs = []
        for r in range(2):  # two repetitions, pooled by both
            p = seq.boxes + rng.normal(0, 3, seq.boxes.shape)
            p[:, 2:] = np.abs(p[:, 2:]) + 1
            p[:, :2] -= 10 * r  # make the runs differ clearly
            (results / seq.name).mkdir(parents=True, exist_ok=True)
            np.savetxt(results / seq.name / f"{seq.name}_{r + 1:03d}.txt", p, fmt="%.6f", delimiter=",")
            runs.append(np.loadtxt(results / seq.name / f"{seq.name}_{r + 1:03d}.txt", delimiter=","))
        np.savetxt(results / seq.name / f"{seq.name}_time.txt", np.full((len(seq), 2), 0.01), delimiter=",")
        preds.append(runs)
    exp = ExperimentGOT10k(str(root), subset="val", result_dir=str(tmp_path / "results"),
                           report_dir=str(tmp_path / "reports"))
    ref = exp.report(["noisy"])["noisy"]["overall"]
    ours = got10k_metrics(preds, [s.boxes for s in ds], [s.cover for s in ds], [s.frame_size() for s in ds])
    assert any((s.cover == 0).any() for s in ds)  # the cover-0 exclusion is exercised
    assert abs(ours["AO"] - ref["ao"]) < 1e-6
    assert abs(ours["SR0.5"] - ref["sr"]) < 1e-6
    np.testing.assert_allclose(ours["success_curve"], ref["succ_curve"], atol=1e-6)


# -- pinned convention differences -----------------------------------------------------------------------------------
def test_pixel_inclusive_iou_equals_continuous_iou():
    """The -1/+1 corrections of pytracking / the LaSOT toolkit cancel: x2 - x1 + 1 with x2 = x + w - 1 is the
    continuous intersection, so both IoUs agree (to got10k's epsilon) -- including sub-pixel boxes."""
    rng = np.random.default_rng(2)
    p, g = _random_track(rng, 200, noise=15)
    np.testing.assert_allclose(iou(p, g, pixel_inclusive=True), iou(p, g), atol=1e-12)
    assert iou(np.array([[0, 0, 10, 10.]]), np.array([[5, 0, 10, 10.]]))[0] == pytest.approx(50 / 150)


def test_thresholds_are_the_toolkits():
    assert len(OVERLAP_THRESHOLDS) == 21 and len(CENTER_THRESHOLDS) == 51 and len(NORM_CENTER_THRESHOLDS) == 51
    assert CENTER_THRESHOLDS[20] == 20 and NORM_CENTER_THRESHOLDS[20] == pytest.approx(0.2)
    torch = pytest.importorskip("torch")
    ref = torch.arange(0.0, 1.0 + 0.05, 0.05, dtype=torch.float64).numpy()  # pytracking's construction
    assert np.array_equal(PYTRACKING_OVERLAP_THRESHOLDS, ref)
    # an IoU one ulp above 0.65 passes got10k's 0.65 threshold but not pytracking's
    v = np.nextafter(0.65, 1.0)
    assert success_curve([v], OVERLAP_THRESHOLDS)[13] == 1.0
    assert success_curve([v], PYTRACKING_OVERLAP_THRESHOLDS)[13] == 0.0


def test_first_frame_is_replaced_by_ground_truth():
    gt = np.array([[10, 10, 20, 20], [10, 10, 20, 20.]])
    pred = np.array([[100, 100, 5, 5], [10, 10, 20, 20.]])
    for conv in ("pytracking", "lasot_toolkit", "got10k"):
        assert sequence_curves(pred, gt, convention=conv)["success"][-2] == 1.0, conv


def test_zero_size_prediction_replaced_by_previous_except_got10k():
    gt = np.array([[10, 10, 20, 20]] * 3, dtype=float)
    pred = np.array([[10, 10, 20, 20], [10, 10, 20, 20], [10, 10, 0, 0.]])
    assert sequence_errors(pred, gt, convention="pytracking")["iou"][2] == pytest.approx(1.0)
    assert sequence_errors(pred, gt, convention="lasot_toolkit")["iou"][2] == pytest.approx(1.0)
    assert sequence_errors(pred, gt, convention="got10k")["iou"][2] == 0.0
    # a run of empty predictions takes the last good box
    run = np.array([[10, 10, 20, 20], [12, 10, 20, 20], [0, 0, 0, 0], [0, 0, 0, 5.]])
    np.testing.assert_allclose(sequence_errors(run, np.repeat(gt[:1], 4, 0))["iou"], [1, 18 / 22, 18 / 22, 18 / 22])
    with pytest.raises(ValueError, match="NaN or negative"):
        sequence_errors(np.array([[0, 0, 1, 1], [0, 0, -1, 1.]]), gt[:2], convention="pytracking")


def test_absent_frames_lasot_toolkit_removes_pytracking_counts_as_miss():
    """4 frames, the last two absent and tracked perfectly: the LaSOT toolkit drops them (SUC 1), pytracking keeps
    them in the denominator as misses (success 0.5 at every threshold below 1)."""
    gt = np.array([[10, 10, 20, 20]] * 4, dtype=float)
    pred = gt.copy()
    absent = np.array([0, 0, 1, 1], bool)
    lasot = sequence_curves(pred, gt, absent, convention="lasot_toolkit")
    pyt = sequence_curves(pred, gt, absent, convention="pytracking")
    assert lasot["success"][:-1].tolist() == [1.0] * 20 and lasot["precision"][0] == 1.0
    assert pyt["success"][:-1].tolist() == [0.5] * 20
    assert pyt["precision"][-1] == 0.5 and pyt["norm_precision"][-1] == 0.5  # absent: centre errors inf
    # exclude_invalid_frames divides by the valid frames instead
    assert sequence_curves(pred, gt, absent, "pytracking", exclude_invalid_frames=True)["success"][0] == 1.0
    # got10k's OTB experiment ignores absence altogether
    assert sequence_curves(pred, gt, absent, convention="got10k")["success"][0] == 1.0


def test_valid_rule_wh_versus_all4_and_the_norm_precision_quirk():
    """A ground-truth box left of the image (1-based x <= 0) is valid for Stark ('wh') but not for pytracking
    7eb9e74 ('all4'); an invalid frame is an IoU miss but -- pytracking's quirk -- a normalised-precision hit."""
    gt = np.array([[10, 10, 20, 20], [-3, 10, 20, 20.]])
    pred = np.array([[10, 10, 20, 20], [50, 50, 20, 20.]])
    wh = sequence_errors(pred, gt, valid_rule="wh")
    all4 = sequence_errors(pred, gt, valid_rule="all4")
    assert wh["valid"].tolist() == [True, True] and all4["valid"].tolist() == [True, False]
    assert wh["iou"][1] == 0.0 and all4["iou"][1] == -1.0
    assert all4["center_error"][1] == np.inf and all4["norm_center_error"][1] == -1.0
    curves = sequence_curves(pred, gt, valid_rule="all4")
    assert curves["norm_precision"][0] == 1.0  # the invalid frame counts as a hit at threshold 0
    assert curves["precision"][-1] == 0.5  # but not for the pixel precision
    # zero-size ground truth is invalid for both rules
    assert not sequence_errors(pred, np.array([[10, 10, 20, 20], [5, 5, 0, 20.]]))["valid"][1]


def test_lasot_toolkit_invalid_ground_truth_is_an_iou_miss_and_a_centre_hit():
    gt = np.array([[10, 10, 20, 20], [-2, 10, 20, 20.]])  # 1-based x = -1 <= 0
    pred = np.array([[10, 10, 20, 20], [80, 80, 20, 20.]])
    e = sequence_errors(pred, gt, convention="lasot_toolkit")
    assert e["iou"][1] == -1.0 and e["center_error"][1] == -1.0
    assert sequence_curves(pred, gt, convention="lasot_toolkit")["precision"][0] == 1.0


def test_normalized_precision_and_dataset_average():
    gt = np.array([[0, 0, 100, 50]] * 2, dtype=float)
    pred = np.array([[0, 0, 100, 50], [15, 0, 100, 50.]])  # centre moves 15 px = 0.15 of the width
    assert normalized_center_error(pred, gt)[1] == pytest.approx(0.15)
    c = sequence_curves(pred, gt)
    assert c["norm_precision"][15] == 1.0 and c["norm_precision"][14] == 0.5
    assert c["precision"][15] == 1.0 and c["precision"][14] == 0.5
    # sequences weigh the same regardless of length
    long_gt = np.array([[0, 0, 10, 10]] * 10, dtype=float)
    long_pred = long_gt + np.array([100, 0, 0, 0.])
    m = ope_metrics([pred, long_pred], [gt, long_gt])
    s_short, s_long = sequence_curves(pred, gt)["success"], sequence_curves(long_pred, long_gt)["success"]
    assert m["SUC"] == pytest.approx(float(((s_short + s_long) / 2).mean()))
    assert s_long[1] == pytest.approx(0.1)  # only the first frame (ground truth) overlaps


def test_got10k_pooling_is_frame_weighted_and_skips_first_and_invisible_frames():
    gt = [np.array([[0, 0, 10, 10]] * 3, dtype=float), np.array([[0, 0, 10, 10]] * 5, dtype=float)]
    bad = np.array([100, 100, 10, 10.])
    pred = [np.array([bad, gt[0][1], bad]), np.array([bad, gt[1][1], gt[1][2], gt[1][3], gt[1][4]])]
    covers = [np.array([8, 8, 8]), np.array([8, 8, 8, 8, 0])]
    m = got10k_metrics(pred, gt, covers)
    # frames kept: seq0 -> [1, 2] (IoU 1, 0); seq1 -> [1, 2, 3] (1, 1, 1); frame 0 never, seq1 frame 4 (cover 0) no
    assert m["AO"] == pytest.approx(4 / 5)
    assert m["SR0.5"] == pytest.approx(4 / 5) and m["SR0.75"] == pytest.approx(4 / 5)
    assert m["per_sequence"] == pytest.approx([0.5, 1.0])
    # clipping to the resolution: a prediction hanging outside the image counts only its inside part
    g = np.array([[0, 0, 10, 10], [0, 0, 10, 10.]])
    p = np.array([[0, 0, 10, 10], [0, 0, 20, 10.]])
    assert got10k_metrics([p], [g], resolutions=[(10, 10)])["AO"] == pytest.approx(1.0)
    assert got10k_metrics([p], [g])["AO"] == pytest.approx(0.5)
