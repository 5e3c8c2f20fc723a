"""Session splits: determinism, independence from the global RNG, JSON round trip, CEC index files."""

import random

import numpy as np
import pytest
import torch

from visadapt.data.base import ArrayImageDataset
from visadapt.data.mini_imagenet import ImageListDataset
from visadapt.data.sessions import (
    SESSION_SPLITS,
    SessionSplit,
    build_session_split,
    make_session_split,
    read_cec_index_files,
    write_cec_index_files,
)

LABELS = [c for c in range(12) for _ in range(20)]  # 12 classes x 20 images, grouped by class
RNG_LABELS = list(np.random.default_rng(123).permutation(LABELS))  # the same, shuffled


def _split(seed=0, labels=RNG_LABELS, **kw):
    args = {"base_classes": 4, "way": 2, "shot": 3, "sessions": 4, "base_shot": None}
    args.update(kw)
    return make_session_split("toy", labels, seed, **args)


def _disturb_global_rng(n):
    random.seed(n)
    np.random.seed(n)
    torch.manual_seed(n)
    random.random(), np.random.rand(), torch.rand(3)


def test_split_is_deterministic_and_ignores_global_rng():
    _disturb_global_rng(1)
    a = _split(seed=7, test_labels=RNG_LABELS, test_per_class=5, class_order="shuffled")
    _disturb_global_rng(999)
    b = _split(seed=7, test_labels=RNG_LABELS, test_per_class=5, class_order="shuffled")
    assert a == b
    # the global generators were neither read nor advanced by the split
    _disturb_global_rng(5)
    before = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    _disturb_global_rng(5)
    _split(seed=7, class_order="shuffled")
    after = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert before == after


def test_split_structure_and_seed_dependence():
    s = _split(seed=0)
    assert s.num_sessions == 5 and s.num_base_classes == 4 and s.num_classes == 12
    assert s.session_classes == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]  # natural order (CEC rule)
    assert len(s.train[0]) == 4 * 20  # all base images
    for t in range(1, 5):
        assert len(s.train[t]) == 2 * 3
        assert sorted({RNG_LABELS[i] for i in s.train[t]}) == s.session_classes[t]
    assert [s.seen_classes(t) for t in range(5)] == [4, 6, 8, 10, 12]
    assert s.label_map() == {c: c for c in range(12)}
    other = _split(seed=1)
    assert other.session_classes == s.session_classes and other.train[1:] != s.train[1:]
    # each class has its own generator: its shots do not depend on how many classes the split holds
    smaller = _split(seed=0, sessions=1)
    assert smaller.train[1] == s.train[1]
    limited = _split(seed=0, base_shot=5)
    assert len(limited.train[0]) == 20 and set(limited.train[0]) <= set(s.train[0])


def test_shuffled_order_and_label_map():
    s = _split(seed=3, class_order="shuffled")
    assert sorted(s.class_order) == list(range(12)) and s.class_order != list(range(12))
    assert s.label_map()[s.class_order[0]] == 0


def test_json_round_trip(tmp_path):
    s = _split(seed=2, test_labels=RNG_LABELS, test_per_class=4)
    s.save(tmp_path / "split.json")
    t = SessionSplit.load(tmp_path / "split.json")
    assert t == s
    assert t.test_indices(RNG_LABELS, 0) == [i for c in range(4) for i in s.test if RNG_LABELS[i] == c]


def test_bad_requests_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="at most 4 sessions"):
        _split(sessions=5)
    with pytest.raises(ValueError, match="fewer than shot"):
        make_session_split("toy", [0] * 10 + [1] * 2, 0, base_classes=1, way=1, shot=3)
    with pytest.raises(FileNotFoundError, match="session split file not found"):
        SessionSplit.load(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="no registered session structure"):
        build_session_split("toy", ArrayImageDataset(np.zeros((2, 2, 2), np.uint8), [0, 1], ["a", "b"]))


def test_registered_benchmark_settings():
    spec = SESSION_SPLITS.get("cifar100")
    assert (spec.base_classes, spec.way, spec.shot, spec.sessions) == (60, 5, 5, 8)
    assert (SESSION_SPLITS.get("cub200").base_classes, SESSION_SPLITS.get("cub200").way) == (100, 10)
    labels = [c for c in range(100) for _ in range(6)]
    ds = ArrayImageDataset(np.zeros((len(labels), 2, 2), np.uint8), labels, [str(c) for c in range(100)])
    with pytest.raises(FileNotFoundError, match="CEC benchmark"):  # CEC's session files are the default
        build_session_split("cifar100", ds, seed=0)
    s = build_session_split("cifar100", ds, seed=0, split_rule="generated")
    assert s.num_sessions == 9 and s.num_base_classes == 60 and all(len(t) == 25 for t in s.train[1:])


def test_cec_index_files_integer_lines(tmp_path):
    ds = ArrayImageDataset(np.zeros((len(RNG_LABELS), 2, 2), np.uint8), RNG_LABELS, [str(c) for c in range(12)])
    s = _split(seed=4)
    files = write_cec_index_files(s, tmp_path / "cifar100")
    assert [f.name for f in files] == [f"session_{k}.txt" for k in range(1, 6)]
    t = read_cec_index_files(tmp_path / "cifar100", ds, "toy", seed=4)
    assert t.session_classes == s.session_classes and t.train == s.train
    assert (t.way, t.shot) == (2, 3) and t.source.startswith("index_files:")
    # via the dataset-level entry point, with the base session limited afterwards
    u = build_session_split("toy", ds, 4, index_dir=tmp_path / "cifar100", base_shot=2)
    assert len(u.train[0]) == 8 and u.train[1:] == s.train[1:]


def test_cec_index_files_path_lines(tmp_path):
    # miniImageNet-style lines: a path whose file name identifies the image
    files = [f"/data/miniimagenet/images/n0{c}000000{i:02d}.jpg" for c in range(3) for i in range(6)]
    labels = [c for c in range(3) for _ in range(6)]
    ds = ImageListDataset(files, labels, ["a", "b", "c"])
    d = tmp_path / "mini_imagenet"
    d.mkdir()
    (d / "session_1.txt").write_text("\n".join(f"MINI-ImageNet/train/n0{c}/n0{c}000000{i:02d}.jpg"
                                               for c in (0, 1) for i in range(6)) + "\n")
    (d / "session_2.txt").write_text("MINI-ImageNet/train/n02/n0200000003.jpg\n"
                                     "MINI-ImageNet/train/n02/n0200000005.jpg\n")
    s = read_cec_index_files(d, ds, "mini_imagenet")
    assert s.session_classes == [[0, 1], [2]] and s.train[1] == [15, 17] and (s.way, s.shot) == (1, 2)
    (d / "session_3.txt").write_text("MINI-ImageNet/train/n09/n0900000001.jpg\n")
    with pytest.raises(ValueError, match="session_3.txt:1: no training image named"):
        read_cec_index_files(d, ds, "mini_imagenet")
    (d / "session_3.txt").unlink()
    (d / "session_4.txt").write_text("1\n")
    with pytest.raises(FileNotFoundError, match="consecutive"):
        read_cec_index_files(d, ds, "mini_imagenet")
