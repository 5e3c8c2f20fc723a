"""Manipulation data: the generator's exact masks and determinism, the readers, the DataModule, bad inputs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from visadapt.data import BadImageError, create_dataset
from visadapt.data.manipulation import (
    CATEGORIES,
    CUES,
    EDITOR_CATEGORY,
    EDITORS,
    ManipulationDataModule,
    ManipulationRecord,
    ManipulationTransform,
    TwinBatchSampler,
    mask_bbox,
    read_manipulation_json,
    write_manipulation_json,
)
from visadapt.data.manipulation.generator import generate, make_group
from visadapt.errors import CorruptFileError

SIZE = 48


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One group per editor (10 authentic + 10 edited images), written and read back."""
    folder = tmp_path_factory.mktemp("gen") / "set"
    json_path = generate(folder, num_images=len(EDITORS), split="train", size=SIZE, seed=3, progress=False)
    return folder, json_path, read_manipulation_json(json_path)


def _load(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_generator_masks_are_exact_and_boxes_are_their_bounding_boxes(generated):
    _, _, records = generated
    by_pair = {}
    for r in records:
        by_pair.setdefault(r.pair_id, []).append(r)
    seen = set()
    for group in by_pair.values():
        real = [r for r in group if r.label == 0]
        edits = [r for r in group if r.label == 1]
        assert len(real) == 1 and len(edits) == 1 and real[0].mask is None and real[0].editor == "authentic"
        base, e = _load(real[0].image), edits[0]
        img = _load(e.image)
        mask = np.asarray(Image.open(e.mask)) > 127
        changed = (img != base).any(-1)
        # every editor composites through its mask: outside it, the twin is bit-identical to the real image
        assert not changed[~mask].any(), e.editor
        assert mask.any() and changed[mask].mean() > 0.3, e.editor
        assert e.boxes == [mask_bbox(mask)], e.editor
        assert e.category == EDITOR_CATEGORY[e.editor] and e.category in CATEGORIES
        assert e.cues and set(e.cues) <= set(CUES) and e.text.startswith("Manipulated.")
        assert real[0].text.startswith("Authentic.")
        seen.add(e.editor)
    assert seen == set(EDITORS)  # round-robin: each editor once


def test_generator_is_deterministic_and_written_losslessly(generated, tmp_path):
    folder, _, records = generated
    again = read_manipulation_json(generate(tmp_path / "again", len(EDITORS), "train", SIZE, seed=3, progress=False))
    for a, b in zip(records, again):
        assert np.array_equal(_load(a.image), _load(b.image))
        assert (a.boxes, a.cues, a.text, a.editor, a.pair_id) == (b.boxes, b.cues, b.text, b.editor, b.pair_id)
    # the PNG files hold exactly the in-memory arrays
    group = make_group(4, list(EDITORS), SIZE, seed=3, stream=0)
    assert np.array_equal(group[0]["image"], _load(folder / "images" / "00004_authentic.png"))
    assert np.array_equal(group[1]["image"], _load(folder / "images" / f"00004_{group[1]['editor']}.png"))
    other = make_group(4, list(EDITORS), SIZE, seed=4, stream=0)
    assert not np.array_equal(group[0]["image"], other[0]["image"])


def test_registered_generator_caches(tmp_path):
    kw = {"root": str(tmp_path), "split": "test", "num_images": 2, "size": 32, "editors": ["blur", "noise"], "seed": 1}
    ds = create_dataset("generated_manipulations", **kw)
    assert len(ds) == 4 and sorted(ds.editors) == ["authentic", "authentic", "blur", "noise"]
    (json_file,) = tmp_path.glob("*/data.json")
    stamp = json_file.stat().st_mtime_ns
    assert len(create_dataset("generated_manipulations", **kw)) == 4 and json_file.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="unknown editor.*splicing"):
        create_dataset("generated_manipulations", root=str(tmp_path), editors=["photoshop"])


def test_json_round_trip_and_plain_imdl_benco_json(generated, tmp_path):
    folder, json_path, records = generated
    copy = write_manipulation_json(records, folder / "copy.json")
    assert read_manipulation_json(copy) == records
    raw = json.loads(copy.read_text())
    assert raw[0][0].startswith("images/") and raw[0][1] == "Negative"  # relative, BenCo's "Negative"
    # plain IMDL-BenCo JSON: two elements per item, no annotations
    plain = write_manipulation_json(records, folder / "plain.json", annotations=False)
    assert all(len(item) == 2 for item in json.loads(plain.read_text()))
    ds = create_dataset("manipulation_json", root=str(plain))
    assert ds.labels == [r.label for r in records]
    s = ds[1]
    mask = np.asarray(Image.open(records[1].mask)) > 127
    x0, y0, x1, y1 = mask_bbox(mask)
    assert s["label"] == 1 and s["has_mask"] and s["has_box"] and not s["has_cues"] and s["category"] == -1
    assert torch.allclose(s["box"], torch.tensor([x0, y0, x1, y1]) / SIZE)
    assert torch.equal(s["mask"][0].bool(), torch.from_numpy(mask))
    a = ds[0]
    assert a["label"] == 0 and a["mask"].sum() == 0 and not a["has_box"] and a["editor"] == "authentic"
    # resizing (IMDL-BenCo's is_resizing): nearest-neighbour mask, the normalised box is unchanged
    ds.transform = ManipulationTransform(image_size=24, mean=(0.5,) * 3, std=(0.25,) * 3)
    r = ds[1]
    assert r["image"].shape == (3, 24, 24) and r["mask"].shape == (1, 24, 24)
    assert set(r["mask"].unique().tolist()) == {0.0, 1.0} and torch.equal(r["box"], s["box"])
    raw_px = torch.from_numpy(np.asarray(Image.open(records[1].image).resize((24, 24), Image.BILINEAR), np.float32))
    assert torch.allclose(r["image"], (raw_px.permute(2, 0, 1) / 255 - 0.5) / 0.25)
    # the annotated file gives categories, cues and text
    full = create_dataset("manipulation_json", root=str(json_path))[1]
    assert full["category"] == CATEGORIES.index(records[1].category) and full["has_cues"]
    assert full["cues"].sum() == len(records[1].cues) and full["text"] == records[1].text


def test_imdl_folder_and_manipbench_folder(tmp_path):
    rng = np.random.default_rng(0)
    img = lambda: Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    m = np.zeros((20, 30), np.uint8)
    m[5:9, 10:22] = 255
    root = tmp_path / "benco"
    for d in ("Tp", "Gt", "Au"):
        (root / d).mkdir(parents=True)
    for name in ("a", "b"):
        img().save(root / "Tp" / f"{name}.png")
        Image.fromarray(m).save(root / "Gt" / f"{name}.png")
    img().save(root / "Au" / "a.jpg")
    ds = create_dataset("imdl_folder", root=str(root))
    assert ds.labels == [1, 1, 0]
    assert ds.records[0].pair_id == ds.records[2].pair_id != ds.records[1].pair_id  # a.png and Au/a.jpg are twins
    assert torch.allclose(ds[0]["box"], torch.tensor([10 / 30, 5 / 20, 22 / 30, 9 / 20]))

    mb = tmp_path / "bench"
    for d in ("real", "editA", "editB", "masks/editB"):
        (mb / d).mkdir(parents=True)
    for stem in ("x", "y"):
        img().save(mb / "real" / f"{stem}.png")
        img().save(mb / "editA" / f"{stem}.png")
    img().save(mb / "editB" / "x.png")
    Image.fromarray(m).save(mb / "masks" / "editB" / "x.png")
    (mb / "annotations.jsonl").write_text(
        json.dumps({"image": "editA/x.png", "boxes": [[1, 2, 11, 12]], "category": "Color", "cues": ["color"],
                    "explanation": "recoloured"}) + "\n")
    ds = create_dataset("manipbench_folder", root=str(mb))
    by = {(r.editor, r.image.rsplit("/", 1)[-1]): i for i, r in enumerate(ds.records)}
    s = ds[by[("editA", "x.png")]]
    assert s["label"] == 1 and not s["has_mask"] and s["has_box"] and s["category"] == CATEGORIES.index("color")
    assert torch.allclose(s["box"], torch.tensor([1 / 30, 2 / 20, 11 / 30, 12 / 20])) and s["text"] == "recoloured"
    assert s["mask"].sum() == 100  # box-only: the filled box stands in for the mask
    sb = ds[by[("editB", "x.png")]]
    assert sb["has_mask"] and sb["mask"].sum() == 4 * 12
    assert s["pair_id"] == sb["pair_id"] == ds[by[("authentic", "x.png")]]["pair_id"]
    assert not ds[by[("editA", "y.png")]]["has_box"]  # no mask, no boxes: nothing to localise


def test_bad_files_are_named(tmp_path, generated):
    _, _, records = generated
    bad = tmp_path / "bad.json"
    bad.write_text('[["a.png", "Negative"],\n ["b.png" "Gt/b.png"]]')
    with pytest.raises(CorruptFileError, match=r"bad\.json.*line 2"):
        read_manipulation_json(bad)
    bad.write_text(json.dumps([["a.png", "Negative"], ["b.png", "m.png", {"category": "explosion"}]]))
    with pytest.raises(CorruptFileError, match=r"bad\.json, item 1: .*explosion"):
        read_manipulation_json(bad)
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        create_dataset("manipulation_json", root=str(tmp_path / "nothere.json"))
    truncated = tmp_path / "trunc.png"
    with open(records[0].image, "rb") as fh:
        truncated.write_bytes(fh.read()[:60])
    ds = create_dataset("manipulation_json", root=str(write_manipulation_json(
        [ManipulationRecord(image=str(truncated))], tmp_path / "t.json")))
    with pytest.raises(BadImageError, match="trunc.png"):
        ds[0]
    small = tmp_path / "small_mask.png"
    Image.fromarray(np.full((5, 5), 255, np.uint8)).save(small)
    ds = create_dataset("manipulation_json", root=str(write_manipulation_json(
        [ManipulationRecord(image=records[1].image, mask=str(small), label=1)], tmp_path / "m.json")))
    with pytest.raises(BadImageError, match="small_mask.png is 5x5"):
        ds[0]


def test_datamodule_holds_editors_out_and_batches_whole_twin_groups(tmp_path):
    dm = ManipulationDataModule(root=str(tmp_path), dataset_kwargs={"size": 32}, image_size=32, num_images=18,
                                test_images=4, test_editors=["copy_move"], batch_size=4, val_fraction=0.25)
    dm.setup()
    assert "copy_move" not in dm.train_set.editors + dm.val_set.editors
    assert set(dm.test_set.editors) == {"authentic", "copy_move"} and len(dm.test_set) == 8
    assert dm.held_out_editors == ["copy_move"] and "copy_move" not in dm.seen_editors
    train_pairs = {r.pair_id for r in dm.train_set.records}
    assert train_pairs.isdisjoint(r.pair_id for r in dm.val_set.records)
    batches = list(dm.train_dataloader())
    assert sum(len(b["label"]) for b in batches) == len(dm.train_set)
    for b in batches:
        assert b["image"].shape[1:] == (3, 32, 32) and b["mask"].shape[1:] == (1, 32, 32)
        for pid in b["pair_id"].unique():  # every twin group is whole: its real image and its edit
            assert sorted(b["label"][b["pair_id"] == pid].tolist()) == [0, 1]
        real = b["label"] == 0
        assert (b["category"][real] == -1).all() and (b["box"][real] == 0).all() and (b["mask"][real] == 0).all()
        assert (b["category"][~real] >= 0).all() and b["has_box"][~real].all()
    with pytest.raises(ValueError, match="both trained on and held out"):
        ManipulationDataModule(train_editors=["blur"], test_editors=["blur"])


def test_twin_sampler_reshuffles_per_epoch_and_flip_moves_the_box():
    sampler = TwinBatchSampler([[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], batch_size=4, seed=0)
    first, second = list(sampler), list(sampler)
    assert len(first) == len(sampler) == 3 and first != second
    assert sorted(i for b in first for i in b) == list(range(10))
    sampler.set_epoch(5)  # set_epoch pins the order of that epoch
    a = list(sampler)
    sampler.set_epoch(5)
    assert list(sampler) == a

    mask = np.zeros((10, 20), bool)
    mask[2:5, 1:6] = True
    box = [1 / 20, 2 / 10, 6 / 20, 5 / 10]
    tf = ManipulationTransform(image_size=None, flip=True)
    torch.manual_seed(0)
    flips = 0
    for _ in range(6):
        _, m, b = tf(Image.fromarray(np.zeros((10, 20, 3), np.uint8)), mask, box)
        x0, y0, x1, y1 = mask_bbox(m[0].numpy())
        assert np.allclose(b, [x0 / 20, y0 / 10, x1 / 20, y1 / 10])
        flips += b != box
    assert 0 < flips < 6


def test_datamodule_on_one_json_file_holds_out_the_groups_of_the_test_editors(generated):
    _, json_path, records = generated
    dm = ManipulationDataModule(dataset="manipulation_json", root=str(json_path), image_size=SIZE,
                                test_editors=["blur", "noise"], val_fraction=0.0, pair_twins=False)
    dm.setup()
    assert sorted(dm.test_set.editors) == ["authentic", "authentic", "blur", "noise"]
    assert len(dm.train_set) == len(records) - 4 and not {"blur", "noise"} & set(dm.train_set.editors)
    assert {r.pair_id for r in dm.train_set.records}.isdisjoint(r.pair_id for r in dm.test_set.records)
    assert "with edits by" in dm.test_source
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape[1:] == (3, SIZE, SIZE)
