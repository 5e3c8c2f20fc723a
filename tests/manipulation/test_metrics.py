"""Manipulation and text metrics against scikit-learn and IMDL-BenCo's definitions; the ELA baseline."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, jaccard_score, roc_auc_score
from torchvision.ops import box_iou as tv_box_iou

from visadapt.methods.ela import ErrorLevelAnalysis, evaluate_ela
from visadapt.metrics.manipulation import (
    box_iou,
    box_metrics,
    breakdown,
    cue_auc,
    cue_f1,
    image_metrics,
    per_editor_image_metrics,
    pixel_metrics,
    pixel_scores,
)
from visadapt.metrics.text import embedding_cosine, lcs_length, mean_rouge_l, rouge_l, tokenize


def test_image_metrics_match_sklearn_and_benco():
    rng = np.random.default_rng(0)
    for trial in range(5):
        y = rng.integers(0, 2, 200)
        s = np.clip(rng.normal(0.35 + 0.3 * y, 0.25), 0, 1).round(2 if trial % 2 else 6)  # ties on odd trials
        s[:3] = 0.5  # exactly at the threshold: not manipulated (score > 0.5)
        m = image_metrics(torch.tensor(s), y)
        pred = (s > 0.5).astype(int)
        assert m["acc"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
        assert m["f1"] == pytest.approx(f1_score(y, pred), abs=1e-12)
        assert m["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        # BenCo's ImageF1: TP/FP/FN over the whole set, 1e-9 guards
        tp, fp, fn = (pred * y).sum(), (pred * (1 - y)).sum(), ((1 - pred) * y).sum()
        p, r = tp / (tp + fp + 1e-9), tp / (tp + fn + 1e-9)
        assert m["f1"] == pytest.approx(2 * p * r / (p + r + 1e-9), abs=1e-7)
    assert np.isnan(image_metrics([0.2, 0.9], [1, 1])["auc"])


def test_per_editor_and_breakdown_match_sklearn_on_subsets():
    rng = np.random.default_rng(1)
    editors = np.array(["authentic"] * 40 + ["blur"] * 15 + ["splicing"] * 25)
    y = (editors != "authentic").astype(int)
    s = rng.random(len(y)) * 0.6 + 0.3 * (editors == "splicing")
    out = per_editor_image_metrics(s, y, editors)
    assert set(out) == {"all", "blur", "splicing"}
    for e in ("blur", "splicing"):
        rows = (editors == "authentic") | (editors == e)
        assert out[e]["auc"] == pytest.approx(roc_auc_score(y[rows], s[rows]))
        assert out[e]["n"] == rows.sum()
    by = breakdown(image_metrics, editors, s, y)
    assert by["splicing"]["acc"] == pytest.approx(accuracy_score(y[editors == "splicing"],
                                                                 s[editors == "splicing"] > 0.5))
    assert np.isnan(by["blur"]["auc"])  # one class only inside the group


def test_cue_f1_matches_sklearn_micro_and_macro():
    rng = np.random.default_rng(2)
    t = (rng.random((60, 12)) < 0.25).astype(int)
    t[:, 4] = 0  # a cue that never occurs ...
    p = rng.random((60, 12))
    p[:, 4] = 0.1  # ... and is never predicted: zero_division decides its F1
    p[:, 5] = 0.9  # a cue always predicted
    for zd in (0.0, 1.0):
        got = cue_f1(p, t, zero_division=zd)
        for avg in ("micro", "macro"):
            assert got[avg] == pytest.approx(f1_score(t, (p > 0.5).astype(int), average=avg, zero_division=zd))
    both = [c for c in range(12) if 0 < t[:, c].sum() < 60]  # sklearn's AUC needs both classes in every label
    p_tied = p.round(1)  # ties between images
    got = cue_auc(p_tied, t)
    assert got["micro"] == pytest.approx(roc_auc_score(t, p_tied, average="micro"))
    assert got["macro"] == pytest.approx(roc_auc_score(t[:, both], p_tied[:, both], average="macro"))
    keep = np.arange(60) % 3 > 0
    assert cue_f1(p, t, valid=keep)["macro"] == pytest.approx(f1_score(t[keep], p[keep] > 0.5, average="macro",
                                                                       zero_division=0))


def _benco_reference(pred, gt, shape=None, threshold=0.5):
    """IMDL-BenCo PixelF1 / PixelIOU / PixelAUC (mode "origin"), written out per image as the notes describe."""
    f1s, ious, aucs = [], [], []
    for i in range(len(pred)):
        p, g = pred[i].astype(np.float64), gt[i].astype(np.float64)
        sm = np.ones_like(g) if shape is None else shape[i].astype(np.float64)
        b = (p > threshold).astype(np.float64)
        tp, fp, fn = (b * g * sm).sum(), (b * (1 - g) * sm).sum(), ((1 - b) * g * sm).sum()
        prec, rec = tp / (tp + fp + 1e-8), tp / (tp + fn + 1e-8)
        f1s.append(2 * prec * rec / (prec + rec + 1e-8))
        pb, gb = ((p * sm) > threshold).astype(np.float64), g * sm
        inter = (pb * gb).sum()
        ious.append(inter / (pb.sum() + gb.sum() - inter + 1e-8))
        yt, ys = (g * sm).ravel(), (p * sm).ravel()
        if yt.sum() == 0:
            aucs.append(0.0)  # BenCo's PixelAUC on an empty mask
            continue
        valid = sm.ravel() > 0
        yt, ys = yt[valid], ys[valid]
        order = np.argsort(-ys, kind="stable")
        ts = yt[order]
        tpr = np.concatenate([[0.0], np.cumsum(ts) / ts.sum()])
        fpr = np.concatenate([[0.0], np.cumsum(1 - ts) / (1 - ts).sum()])
        aucs.append(float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2)))  # sort + trapezoid
    return np.array(f1s), np.array(ious), np.array(aucs)


def test_pixel_metrics_follow_imdl_benco_including_empty_masks():
    rng = np.random.default_rng(3)
    n, h, w = 6, 16, 20
    gt = np.zeros((n, 1, h, w))
    for i in range(4):  # images 0-3 manipulated, 4-5 authentic (empty masks)
        y0, x0 = rng.integers(0, 8, 2)
        gt[i, 0, y0:y0 + 6, x0:x0 + 9] = 1
    pred = np.clip(gt * 0.4 + rng.random(gt.shape) * 0.7, 0, 1)  # continuous: no ties
    pred[5] = 0.0  # a perfect prediction on an authentic image
    pred[:4, 0, 0, :3] = 0.5  # exactly at the threshold: not predicted (pred > 0.5)
    shape = np.ones_like(gt)
    shape[:, :, :, -4:] = 0  # padded columns

    for sm in (None, shape):
        got = pixel_scores(torch.tensor(pred), gt, shape_mask=sm)
        f1, iou, auc = _benco_reference(pred[:, 0], gt[:, 0], None if sm is None else sm[:, 0])
        assert np.allclose(got["f1"], f1, atol=1e-12) and np.allclose(got["iou"], iou, atol=1e-12)
        assert np.allclose(got["auc"], auc, atol=1e-12)
        assert got["empty"].tolist() == [False] * 4 + [True] * 2
    # the empty-mask rule: BenCo scores an authentic image 0 even when the prediction is perfect
    got = pixel_scores(pred, gt)
    assert got["f1"][5] == 0 and got["iou"][5] == 0 and got["auc"][5] == 0
    f1, iou, auc = _benco_reference(pred[:, 0], gt[:, 0])
    skip, zero, one = (pixel_metrics(pred, gt, empty=e) for e in ("skip", "zero", "sklearn"))
    assert skip["n"] == 4 and skip["f1"] == pytest.approx(f1[:4].mean()) and skip["auc"] == pytest.approx(auc[:4].mean())
    assert zero["n"] == 6 and zero["f1"] == pytest.approx(f1.mean()) and zero["iou"] == pytest.approx(iou.mean())
    # BenCo's scikit-learn cross-check: per-image f1_score / jaccard_score with zero_division=1
    sk = [f1_score(gt[i].ravel(), pred[i].ravel() > 0.5, zero_division=1) for i in range(n)]
    skj = [jaccard_score(gt[i].ravel(), pred[i].ravel() > 0.5, zero_division=1) for i in range(n)]
    assert sk[4] == 0 and sk[5] == 1  # false alarms on an authentic image score 0, a clean prediction 1
    assert one["f1"] == pytest.approx(np.mean(sk)) and one["iou"] == pytest.approx(np.mean(skj))
    assert one["auc"] == pytest.approx(auc[:4].mean())
    # per-image AUC equals scikit-learn's on each manipulated image
    for i in range(4):
        assert got["auc"][i] == pytest.approx(roc_auc_score(gt[i].ravel(), pred[i].ravel()))


def test_box_iou_matches_torchvision_and_known_values():
    rng = np.random.default_rng(4)
    a = np.sort(rng.random((30, 2, 2)), axis=1).transpose(0, 2, 1).reshape(30, 4)[:, [0, 2, 1, 3]]
    b = np.sort(rng.random((30, 2, 2)), axis=1).transpose(0, 2, 1).reshape(30, 4)[:, [0, 2, 1, 3]]
    ref = tv_box_iou(torch.tensor(a), torch.tensor(b)).diagonal().numpy()
    assert np.allclose(box_iou(a, b), ref, atol=1e-12)
    m = box_metrics([[0, 0, 2, 2], [0, 0, 1, 1], [5, 5, 6, 6]], [[1, 1, 3, 3], [0, 0, 1, 1], [0, 0, 1, 1]])
    assert m["iou"] == pytest.approx((1 / 7 + 1 + 0) / 3) and m["iou50"] == pytest.approx(1 / 3)
    assert box_metrics([[0, 0, 1, 1]], [[0, 0, 1, 1]], valid=[False])["n"] == 0


def test_rouge_l_against_hand_values_and_brute_force_lcs():
    assert tokenize("Police killed the gunman!") == ["police", "killed", "the", "gunman"]
    r = rouge_l("police kill the gunman", "police killed the gunman")  # Lin (2004): LCS 3 of 4 and 4
    assert (r["precision"], r["recall"], r["f"]) == (0.75, 0.75, 0.75)
    r = rouge_l("the gunman kill police", "police killed the gunman")  # LCS "the gunman": 2
    assert r["f"] == pytest.approx(0.5)
    r = rouge_l("a b c", "a x b y z", beta=1.2)
    p, rec = 2 / 3, 2 / 5
    assert r["f"] == pytest.approx((1 + 1.44) * p * rec / (rec + 1.44 * p))
    rng = np.random.default_rng(5)
    for _ in range(30):
        a = list(rng.integers(0, 4, rng.integers(0, 8)))
        b = list(rng.integers(0, 4, rng.integers(0, 8)))
        brute = max((k for k in range(len(a) + 1) for sub in itertools.combinations(a, k)
                     if _is_subsequence(sub, b)), default=0)
        assert lcs_length(a, b) == brute
    assert mean_rouge_l(["x y", ""], ["x y", "z"]) == pytest.approx(0.5)


def _is_subsequence(sub, seq):
    it = iter(seq)
    return all(any(x == y for y in it) for x in sub)


def test_embedding_cosine_with_a_given_embedding():
    vocab = ["region", "blurred", "pasted", "authentic", "image"]

    def embed(texts):
        return np.array([[t.split().count(v) for v in vocab] for t in texts], float)

    out = embedding_cosine(["region blurred", "authentic image"], ["region pasted", "authentic image image"], embed)
    assert out["per_pair"][0] == pytest.approx(0.5)
    assert out["per_pair"][1] == pytest.approx(3 / np.sqrt(2 * 5))
    assert out["mean"] == pytest.approx((0.5 + 3 / np.sqrt(10)) / 2)


def test_ela_finds_a_region_with_another_compression_history():
    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[0:96, 0:128]
    photo = np.stack([(xx * 2) % 256, (yy * 2 + xx) % 256, (128 + 60 * np.sin(xx / 9.0) * np.cos(yy / 7.0))], -1)
    photo = Image.fromarray(np.clip(photo + rng.normal(0, 6, photo.shape), 0, 255).astype(np.uint8))
    ela = ErrorLevelAnalysis(quality=90)
    from io import BytesIO

    buf = BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    authentic = Image.open(BytesIO(buf.getvalue())).convert("RGB")  # compressed once, like a camera photo
    edited = np.asarray(authentic).copy()
    edited[40:72, 64:104] = rng.integers(0, 256, (32, 40, 3))  # an uncompressed patch
    edited = Image.fromarray(edited)
    a, e = ela.predict(authentic), ela.predict(edited)
    assert 0 <= a["score"] < e["score"] <= 1
    assert e["heatmap"].shape == (96, 128)
    assert box_iou([e["box"]], [[64 / 128, 40 / 96, 104 / 128, 72 / 96]])[0] > 0.7
    assert e["heatmap"][40:72, 64:104].mean() > 5 * e["heatmap"][:32].mean()


def test_evaluate_ela_equals_the_metrics_of_its_own_predictions(tmp_path):
    from visadapt.data import create_dataset

    ds = create_dataset("generated_manipulations", root=str(tmp_path), split="test", num_images=6, size=48,
                        editors=["noise", "splicing"], seed=2)
    res = evaluate_ela(ds, progress=False)
    ela = ErrorLevelAnalysis()
    preds = [ela.predict(ds.sample(i)["image"]) for i in range(len(ds))]
    scores = np.array([p["score"] for p in preds])
    assert res["image"]["auc"] == pytest.approx(roc_auc_score(ds.labels, scores))
    assert set(res["image_per_editor"]) == {"noise", "splicing"} and res["n"] == 12
    edited = [i for i in range(len(ds)) if ds.labels[i] == 1]
    masks = np.stack([ds.sample(i)["mask"] for i in edited])
    heat = np.stack([preds[i]["heatmap"] for i in edited])
    assert res["pixel"]["f1"] == pytest.approx(pixel_metrics(heat, masks)["f1"])
    assert res["pixel"]["n"] == 6 and res["box"]["n"] == 6
