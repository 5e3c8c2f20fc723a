import random

import pytest
import torch

from visadapt.data import FewShotDataModule, FewShotSplit, base_novel_classes, make_fewshot_split, sample_per_class
from visadapt.data.photos import procedural_shapes

LABELS = [i % 7 for i in range(700)]


def test_sampler_is_deterministic_and_independent_of_global_state():
    a = sample_per_class(LABELS, 5, seed=3)
    random.seed(123)
    torch.manual_seed(99)
    _ = [random.random() for _ in range(17)]
    b = sample_per_class(LABELS, 5, seed=3)
    state = random.getstate()
    c = sample_per_class(LABELS, 5, seed=3)
    assert a == b == c
    assert random.getstate() == state  # the global generator is not consumed
    assert sample_per_class(LABELS, 5, seed=4) != a


def test_sampler_counts_and_short_classes():
    idx = sample_per_class(LABELS, 5, seed=1)
    counts = {c: sum(LABELS[i] == c for i in idx) for c in range(7)}
    assert counts == {c: 5 for c in range(7)}
    short = [0, 0, 1, 1, 1, 1]
    assert sum(short[i] == 0 for i in sample_per_class(short, 3, seed=0)) == 2  # fewer than K: all kept


def test_val_uses_min_k_4_and_no_overlap_without_val_split():
    split = make_fewshot_split("x", LABELS, None, shots=8, seed=1)
    assert len(split.train) == 8 * 7 and len(split.val) == 4 * 7
    assert not set(split.train) & set(split.val)
    split2 = make_fewshot_split("x", LABELS, None, shots=2, seed=1)
    assert len(split2.val) == 2 * 7


def test_split_json_roundtrip(tmp_path):
    split = make_fewshot_split("x", LABELS, LABELS, shots=4, seed=2)
    split.save(tmp_path / "s.json")
    assert FewShotSplit.load(tmp_path / "s.json") == split
    (tmp_path / "bad.json").write_text('{"foo": 1}')
    with pytest.raises(ValueError, match="not a few-shot split file"):
        FewShotSplit.load(tmp_path / "bad.json")


def test_base_novel_rule():
    assert base_novel_classes(10) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert base_novel_classes(37) == (list(range(19)), list(range(19, 37)))  # OxfordPets: 19 / 18


def test_datamodule_subsets_and_split_file(tmp_path):
    dm = FewShotDataModule("procedural_shapes", shots=3, seed=5, train_classes="base",
                           eval_subsets=["base", "novel"], split_file=str(tmp_path / "split.json"),
                           dataset_kwargs={"num_per_class": 10, "image_size": 16})
    dm.setup()
    assert dm.subset_classnames("base") == ["circle", "square", "triangle"]
    assert dm.subset_classnames("novel") == ["cross", "bar"]
    assert sorted(set(dm.train_set.labels)) == [0, 1, 2] and len(dm.train_set) == 9
    novel = dm.test_sets["novel"]
    assert sorted(set(novel.labels)) == [0, 1] and novel.classnames == ["cross", "bar"]
    # relabelled samples carry the subset's class names
    s = novel[0]
    assert s["classname"] == novel.classnames[s["label"]]
    assert tuple(s["image"].shape) == (3, 224, 224)
    dm2 = FewShotDataModule("procedural_shapes", shots=3, seed=5, train_classes="base",
                            split_file=str(tmp_path / "split.json"),
                            dataset_kwargs={"num_per_class": 10, "image_size": 16})
    dm2.setup()
    assert dm2.split == dm.split
    dm3 = FewShotDataModule("procedural_shapes", shots=4, seed=5, train_classes="base",
                            split_file=str(tmp_path / "split.json"), dataset_kwargs={"num_per_class": 10})
    with pytest.raises(ValueError, match="holds a split for"):
        dm3.setup()


def test_procedural_dataset_is_a_function_of_seed():
    a, b = procedural_shapes(seed=1, num_per_class=3), procedural_shapes(seed=1, num_per_class=3)
    assert (a.images == b.images).all() and a.labels == b.labels
    assert not (procedural_shapes(seed=2, num_per_class=3).images == a.images).all()
    assert not (procedural_shapes(split="test", seed=1, num_per_class=3).images == a.images).all()
