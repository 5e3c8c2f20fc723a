import random

import pytest
import torch

from visadapt.data import FewShotDataModule, FewShotSplit, base_novel_classes, make_fewshot_split, sample_per_class
from visadapt.data.fewshot import NotEnoughImagesError, draw_fewshot
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


# -- the papers' draws, against independent re-implementations of the official code -------------------------------
def shuffled_labels(n_classes=6, per_class=9, seed=0):
    """A generated split whose labels first appear out of order (5, 2, 0, ...), interleaved."""
    labels = [c for c in range(n_classes) for _ in range(per_class)]
    random.Random(seed).shuffle(labels)
    assert labels[:n_classes] != sorted(labels[:n_classes])
    first = list(dict.fromkeys(labels))
    assert first != sorted(first)  # first-appearance order is not the sorted order
    return labels


def dassl_reference(train_labels, val_labels, shots, seed):
    """CoOp's dataset code: ``random.seed(seed)`` (Dassl's set_random_seed), then Dassl's generate_fewshot_dataset
    (labels grouped with a defaultdict, i.e. first-appearance order; ``random.sample`` per label; repeat=False)
    over train with K, then over val with min(K, 4), on the same global stream."""
    from collections import defaultdict

    def generate(items_labels, k):
        tracker = defaultdict(list)
        for i, y in enumerate(items_labels):
            tracker[y].append(i)
        out = []
        for _, items in tracker.items():
            out.extend(random.sample(items, k) if len(items) >= k else items)
        return out

    state = random.getstate()
    try:
        random.seed(seed)
        train = generate(train_labels, shots)
        val = generate(val_labels, min(shots, 4))
    finally:
        random.setstate(state)
    return train, val


def clip_lora_reference(train_labels, val_labels, shots, seed):
    """CLIP-LoRA's datasets/*.py: ``random.seed(seed)``, then val (min(K, 4)) BEFORE train (K), each with
    generate_fewshot_dataset(repeat=True): ``random.choices`` for a label with fewer items. Without a val split
    (its imagenet.py): per label ``random.sample(items, K + min(K, 4))``, first K train, the rest val."""
    from collections import defaultdict

    def by_label(labels):
        tracker = defaultdict(list)
        for i, y in enumerate(labels):
            tracker[y].append(i)
        return tracker

    def generate(labels, k):
        out = []
        for _, items in by_label(labels).items():
            out.extend(random.sample(items, k) if len(items) >= k else random.choices(items, k=k))
        return out

    state = random.getstate()
    try:
        random.seed(seed)
        if val_labels is None:
            train, val = [], []
            v = min(shots, 4)
            for _, items in by_label(train_labels).items():
                s = random.sample(items, shots + v)
                train += s[:shots]
                val += s[shots:]
            return train, val
        val = generate(val_labels, min(shots, 4))
        train = generate(train_labels, shots)
    finally:
        random.setstate(state)
    return train, val


@pytest.mark.parametrize("shots, seed", [(1, 1), (4, 2), (8, 3)])
def test_coop_draw_is_dassl_exactly(shots, seed):
    train_labels, val_labels = shuffled_labels(seed=seed), shuffled_labels(per_class=5, seed=seed + 10)
    ref_train, ref_val = dassl_reference(train_labels, val_labels, shots, seed)
    before = random.getstate()
    split = draw_fewshot("x", train_labels, val_labels, shots, seed)  # the default draw
    assert random.getstate() == before  # the global generator is neither read nor changed
    assert split.draw == "coop"
    assert split.train == ref_train and split.val == ref_val  # the same images, in the same order
    # and not what sorted labels would give (the old rule)
    assert sample_per_class(train_labels, shots, seed) != sorted(ref_train) or shots == 1


@pytest.mark.parametrize("shots, seed", [(2, 1), (4, 2), (8, 3)])
def test_clip_lora_draw_is_clip_lora_exactly(shots, seed):
    train_labels = shuffled_labels(seed=seed)
    val_labels = shuffled_labels(per_class=3, seed=seed + 10)  # 3 < min(K, 4) at K >= 4: repeats
    ref_train, ref_val = clip_lora_reference(train_labels, val_labels, shots, seed)
    split = draw_fewshot("x", train_labels, val_labels, shots, seed, draw="clip_lora", short_classes="repeat")
    assert split.train == ref_train and split.val == ref_val
    coop = draw_fewshot("x", train_labels, val_labels, shots, seed, short_classes="keep")
    assert coop.train != split.train  # the two papers' draws really differ for one seed
    # without a val split: CLIP-LoRA's ImageNet rule
    train_labels = shuffled_labels(per_class=12, seed=seed)  # K + min(K, 4) <= 12 per class
    ref_train, ref_val = clip_lora_reference(train_labels, None, shots, seed)
    split = draw_fewshot("x", train_labels, None, shots, seed, draw="clip_lora")
    assert split.train == ref_train and split.val == ref_val and split.val_from_train


def test_base2novel_draws_over_all_classes_then_keeps_the_subset():
    """CoOp draws the few-shot set over every class, then ``subsample_classes``: the base shots are the
    all-class draw restricted to the base labels."""
    labels = shuffled_labels()
    full = draw_fewshot("x", labels, None, 3, 1)
    base = draw_fewshot("x", labels, None, 3, 1, classes=[0, 1, 2])
    assert base.train == [i for i in full.train if labels[i] in (0, 1, 2)]
    assert base.classes == [0, 1, 2]


def test_short_class_is_an_error_naming_the_class_and_counts_or_reported_when_kept():
    labels = [0] * 10 + [1] * 3 + [2] * 10
    with pytest.raises(NotEnoughImagesError, match=r"'b' \(label 1\) has 3 training image\(s\), fewer than the 4"):
        draw_fewshot("x", labels, labels, 4, 1, classnames=["a", "b", "c"])
    kept = draw_fewshot("x", labels, labels, 4, 1, short_classes="keep", classnames=["a", "b", "c"])
    assert sum(labels[i] == 1 for i in kept.train) == 3
    assert kept.shots_used == {"1": [3, 3]}  # train, val (min(K, 4) = 4 asked of 3)
    repeated = draw_fewshot("x", labels, labels, 4, 1, short_classes="repeat")
    assert sum(labels[i] == 1 for i in repeated.train) == 4 and len(set(repeated.train)) < len(repeated.train)
    # validation from held-out training images: 10 images cannot give 8 training + 4 validation shots
    with pytest.raises(NotEnoughImagesError, match="held-out training"):
        draw_fewshot("x", [0] * 10 + [1] * 12, None, 8, 1)


def test_datamodule_short_class_error_and_report(tmp_path):
    kw = dict(dataset_kwargs={"num_per_class": 4, "image_size": 16}, seed=1)
    with pytest.raises(NotEnoughImagesError, match="circle"):
        FewShotDataModule("procedural_shapes", shots=6, **kw).setup()
    dm = FewShotDataModule("procedural_shapes", shots=6, short_classes="keep", **kw)
    dm.setup()
    assert len(dm.train_set) == 4 * 5 and len(dm.val_set) == 0
    assert dm.split.shots_used == {str(c): [4, 0] for c in range(5)}
    with pytest.raises(ValueError, match="short_classes"):
        FewShotDataModule("procedural_shapes", short_classes="silently")
    with pytest.raises(ValueError, match="draw"):
        FewShotDataModule("procedural_shapes", draw="tip_adapter")
