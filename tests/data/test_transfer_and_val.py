"""Transfer targets (cross-dataset / domain generalisation), held-out validation shots and the digits dataset."""

import numpy as np
import pytest

from visadapt.data import FewShotDataModule, create_dataset, make_fewshot_split

LABELS = [i % 7 for i in range(700)]
SHAPES = {"num_per_class": 10, "image_size": 16}


def test_val_shots_enlarge_validation_without_touching_training_shots():
    coop = make_fewshot_split("x", LABELS, None, shots=8, seed=1)
    held = make_fewshot_split("x", LABELS, None, shots=8, seed=1, val_shots=30)
    assert held.train == coop.train  # the training shots do not depend on val_shots
    assert len(held.val) == 30 * 7 and not set(held.val) & set(held.train)


def test_val_shots_mismatch_with_a_saved_split_is_an_error(tmp_path):
    kw = dict(shots=2, seed=1, split_file=str(tmp_path / "s.json"), dataset_kwargs=SHAPES)
    FewShotDataModule("procedural_shapes", **kw).setup()
    with pytest.raises(ValueError, match="val_shots"):
        FewShotDataModule("procedural_shapes", val_shots=5, **kw).setup()


def test_targets_become_extra_test_sets_with_their_own_classes():
    dm = FewShotDataModule("procedural_shapes", shots=2, seed=1, train_classes="base", eval_subsets=["base"],
                           dataset_kwargs=SHAPES, test_per_class=3,
                           targets={"shifted": {"dataset": "procedural_shapes",
                                                "dataset_kwargs": {**SHAPES, "seed": 7}},
                                    "digits": {"dataset": "digits"}})
    dm.setup()
    assert dm.test_names == ["base", "shifted", "digits"]
    assert len(dm.test_dataloader()) == 3
    assert dm.test_classnames("base") == ["circle", "square", "triangle"]
    assert dm.test_classnames("shifted") == ["circle", "square", "triangle", "cross", "bar"]  # all its classes
    assert dm.test_classnames("digits") == [str(i) for i in range(10)]
    assert dm.test_dataset_name("digits") == "digits" and dm.test_dataset_name("base") == "procedural_shapes"
    digits = dm.test_sets["digits"]
    assert len(digits) == 30 and sorted(set(digits.labels)) == list(range(10))  # capped by test_per_class
    s = digits[0]
    assert s["classname"] == str(s["label"]) and tuple(s["image"].shape) == (3, 224, 224)


@pytest.mark.parametrize("targets, match", [
    ({"base": {"dataset": "digits"}}, "clashes"),
    ({"t": {"dataset": "nope"}}, "unknown dataset 'nope'"),
    ({"t": {"dataset": "digits", "kwargs": {}}}, "unknown key"),
    ({"t": "digits"}, "needs a mapping"),
])
def test_bad_targets_fail_at_construction(targets, match):
    with pytest.raises(ValueError, match=match):
        FewShotDataModule("procedural_shapes", targets=targets)


def test_digits_split_is_fixed_disjoint_and_complete():
    from sklearn.datasets import load_digits

    train, test, full = (create_dataset("digits", split=s) for s in ("train", "test", "all"))
    assert len(train) + len(test) == len(full) == 1797
    ref = load_digits()
    # every image appears once across the two halves, scaled from 0..16 to 0..255
    both = np.concatenate([train.images, test.images]).astype(np.float64) / 255 * 16
    assert np.allclose(np.sort(both.reshape(len(full), -1).sum(1)), np.sort(ref.images.reshape(1797, -1).sum(1)),
                       atol=0.5)
    # half of every class (the odd positions of a seeded per-class permutation)
    assert np.bincount(test.labels, minlength=10).tolist() == (np.bincount(ref.target) // 2).tolist()
    assert full.images.max() == 255
    assert create_dataset("digits", split="test").labels == test.labels  # deterministic
    with pytest.raises(ValueError, match="split"):
        create_dataset("digits", split="val")


# -- nothing is chosen on test images -----------------------------------------------------------------------------
def fake_imagenet(root, per_class=12, val_per_class=3):
    from tests.data.test_coop import write_png

    base = root / "imagenet"
    base.mkdir(parents=True)
    (base / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n")
    for c, wnid in enumerate(("n01440764", "n01443537", "n01484850")):
        for k in range(per_class):
            write_png(base / f"images/train/{wnid}/t{k}.JPEG", 40 * c + k)
        for k in range(val_per_class):
            write_png(base / f"images/val/{wnid}/v{k}.JPEG", 40 * c + k)
    return base


def test_a_val_split_that_is_the_test_set_is_replaced_by_held_out_training_images(tmp_path):
    base = fake_imagenet(tmp_path)
    dm = FewShotDataModule("imagenet", root=str(tmp_path), val_split="val", shots=2, seed=1)
    dm.setup()
    assert dm.val_source.startswith("held-out training images") and "test images" in dm.val_source
    val_paths = {dm.val_set.describe(i) for i in range(len(dm.val_set))}
    train_paths = {dm.train_set.describe(i) for i in range(len(dm.train_set))}
    assert len(val_paths) == 2 * 3 and all("/images/train/" in p for p in val_paths)
    assert not val_paths & train_paths
    assert not val_paths & {str(p) for p in (base / "images/val").rglob("*.JPEG")}
    # a genuine val split stays the validation source
    shapes = FewShotDataModule("procedural_shapes", shots=2, val_split="val",
                               dataset_kwargs={"num_per_class": 6, "image_size": 16})
    shapes.setup()
    assert shapes.val_source == "val split"
    # naming the test split as val is caught too
    same = FewShotDataModule("procedural_shapes", shots=2, val_split="test", dataset_kwargs={"num_per_class": 6})
    same.setup()
    assert same.val_source.startswith("held-out training images")


def test_the_linear_probe_report_says_where_C_was_chosen(tmp_path):
    import lightning.pytorch as pl

    from visadapt.adapters import LoRAConfig
    from visadapt.methods import ClipFewShot

    fake_imagenet(tmp_path / "data")
    model = ClipFewShot("tiny_open_clip", adapter=LoRAConfig(target="attn_qkv", r=2))
    dm = FewShotDataModule("imagenet", root=str(tmp_path / "data"), val_split="val", shots=2, seed=1,
                           augment="none", preprocess=model.preprocess)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert model.report["linear_probe_C_chosen_on"].startswith("held-out training images")
    assert model.report["few_shot"]["validation"] == dm.val_source
    assert model.report["few_shot"]["draw"] == "coop" and model.report["few_shot"]["val_images"] == 6
