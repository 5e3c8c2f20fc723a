"""Tracking data: readers on tiny folders, the procedural generator, SiamFC crops, the pair sampler, the DataModule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visadapt.data import DATASETS
from visadapt.data.base import BadImageError
from visadapt.data.tracking import (
    TrackingPairDataModule,
    TrackingPairDataset,
    TrackingSequence,
    box_from_crop,
    box_to_crop,
    crop_around,
)
from visadapt.data.tracking.got10k import read_got10k
from visadapt.data.tracking.pairs import PairConfig, jittered_params
from visadapt.data.tracking.synthetic import OBJECT_PHOTOS, SyntheticConfig, cover_bin, generate, render_sequence
from visadapt.errors import CorruptFileError, UserError

TINY = SyntheticConfig(num_frames=30, frame_size=(96, 72), occlusion_prob=1.0, out_of_view_prob=1.0)


def _jpgs(folder: Path, n: int, start: int = 1, fmt: str = "{:08d}.jpg") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        Image.new("RGB", (16, 12), (i * 20 % 255, 0, 0)).save(folder / fmt.format(i))


# -- readers ---------------------------------------------------------------------------------------------------------
def _lasot(root: Path) -> None:
    seq = root / "cat" / "cat-1"
    _jpgs(seq / "img", 4)  # one image more than annotations (as monkey-17)
    (seq / "groundtruth.txt").write_text("1,1,5,6\n3,2,5,6\n4,3,0,0\n")
    (seq / "full_occlusion.txt").write_text("0,0,1")
    (seq / "out_of_view.txt").write_text("0,1,0")
    seq2 = root / "dog" / "dog-3"
    _jpgs(seq2 / "img", 2)
    (seq2 / "groundtruth.txt").write_text("2,2,4,4\n2,2,4,4\n")
    (seq2 / "full_occlusion.txt").write_text("0,0")
    (seq2 / "out_of_view.txt").write_text("0,0")
    (root / "testing_set.txt").write_text("cat-1\n")
    (root / "training_set.txt").write_text("dog-3\n")


def test_lasot_reader_converts_one_based_boxes_and_reads_flags(tmp_path):
    _lasot(tmp_path)
    test = DATASETS.get("lasot")(root=str(tmp_path), split="test")
    assert [s.name for s in test] == ["cat-1"]
    seq = test[0]
    np.testing.assert_array_equal(seq.boxes, [[0, 0, 5, 6], [2, 1, 5, 6], [3, 2, 0, 0]])
    assert seq.absent.tolist() == [False, True, True]
    assert seq.full_occlusion.tolist() == [0, 0, 1] and seq.out_of_view.tolist() == [0, 1, 0]
    assert len(seq) == 3 and seq.frames[-1].name == "00000003.jpg"  # extra image dropped
    assert seq.load_frame(1).shape == (12, 16, 3) and seq.load_frame(1).dtype == np.uint8
    assert [s.name for s in DATASETS.get("lasot")(root=str(tmp_path), split="train")] == ["dog-3"]
    assert sorted(s.name for s in DATASETS.get("lasot")(root=str(tmp_path), split="all")) == ["cat-1", "dog-3"]


def test_lasot_reader_errors_name_file_and_line(tmp_path):
    _lasot(tmp_path)
    (tmp_path / "cat" / "cat-1" / "groundtruth.txt").write_text("1,1,5,6\n3,2,five,6\n4,3,0,0\n")
    with pytest.raises(CorruptFileError, match=r"cat-1/groundtruth.txt:2: expected 4 numbers"):
        DATASETS.get("lasot")(root=str(tmp_path), split="test")
    (tmp_path / "testing_set.txt").unlink()
    with pytest.raises(UserError, match="testing_set.txt"):
        DATASETS.get("lasot")(root=str(tmp_path), split="test")


def _got10k(root: Path) -> None:
    for i, name in enumerate(["GOT-10k_Train_000001", "GOT-10k_Train_000002", "GOT-10k_Train_000003"]):
        seq = root / "train" / name
        _jpgs(seq, 3)
        (seq / "groundtruth.txt").write_text(f"{i},1,5,6\n2,2,5,6\n0,0,0,0\n")
        (seq / "absence.label").write_text("0\n0\n1\n")
        (seq / "cover.label").write_text("8\n5\n0\n")
        (seq / "meta_info.ini").write_text("[METAINFO]\nresolution: (16, 12)\n")
    (root / "train" / "list.txt").write_text("GOT-10k_Train_000001\nGOT-10k_Train_000002\nGOT-10k_Train_000003\n")
    _jpgs(root / "test" / "GOT-10k_Test_000001", 4)
    (root / "test" / "GOT-10k_Test_000001" / "groundtruth.txt").write_text("1,1,5,6\n")
    (root / "test" / "list.txt").write_text("GOT-10k_Test_000001\n")


def test_got10k_reader_labels_vot_split_and_test_ground_truth(tmp_path):
    _got10k(tmp_path)
    train = DATASETS.get("got10k")(root=str(tmp_path), split="train")
    assert len(train) == 3
    s = train[1]
    np.testing.assert_array_equal(s.boxes[0], [1, 1, 5, 6])
    assert s.absent.tolist() == [False, False, True] and s.cover.tolist() == [8, 5, 0]
    assert s.resolution == (16, 12) and s.fully_annotated
    split = tmp_path / "vot_train.txt"
    split.write_text("2\n0\n")  # pytracking's format: indices into train/list.txt
    vot = DATASETS.get("got10k")(root=str(tmp_path), split="vot_train", split_file=str(split))
    assert [x.name for x in vot] == ["GOT-10k_Train_000003", "GOT-10k_Train_000001"]
    with pytest.raises(UserError, match="split_file"):
        DATASETS.get("got10k")(root=str(tmp_path), split="vot_train")
    test = DATASETS.get("got10k")(root=str(tmp_path), split="test")
    assert len(test[0]) == 4 and len(test[0].boxes) == 1 and not test[0].fully_annotated


def test_got10k_reader_bad_label_bad_folder_bad_image(tmp_path):
    _got10k(tmp_path)
    seq = tmp_path / "train" / "GOT-10k_Train_000002"
    (seq / "cover.label").write_text("8\n9\n0\n")
    with pytest.raises(CorruptFileError, match=r"GOT-10k_Train_000002/cover.label:2: expected an integer label"):
        read_got10k(tmp_path, "train")
    (seq / "cover.label").write_text("8\n5\n0\n")
    for f in seq.glob("*.jpg"):
        f.unlink()
    with pytest.raises(UserError, match=r"GOT-10k_Train_000002 holds no"):
        read_got10k(tmp_path, "train")
    _jpgs(seq, 3)
    (seq / "00000002.jpg").write_bytes(b"not a jpeg")
    s = read_got10k(tmp_path, "train")[1]
    with pytest.raises(BadImageError, match=r"00000002.jpg.*frame 1 of sequence 'GOT-10k_Train_000002'"):
        s.load_frame(1)


def test_trackingnet_reader_numeric_frame_order(tmp_path):
    chunk = tmp_path / "TRAIN_0"
    _jpgs(chunk / "frames" / "vid", 12, start=0, fmt="{}.jpg")
    (chunk / "anno").mkdir()
    (chunk / "anno" / "vid.txt").write_text("\n".join(f"{i},{i},4,4" for i in range(12)) + "\n")
    ds = DATASETS.get("trackingnet")(root=str(tmp_path), split="train")
    s = ds[0]
    assert [p.name for p in s.frames[:3]] + [s.frames[-1].name] == ["0.jpg", "1.jpg", "2.jpg", "11.jpg"]
    assert s.boxes[11].tolist() == [11, 11, 4, 4]
    (chunk / "anno" / "vid.txt").write_text("1,1,4,4\n" * 5)
    with pytest.raises(UserError, match="5 boxes for 12 images"):
        DATASETS.get("trackingnet")(root=str(tmp_path), split="train")


def test_coco_pairs_reader(tmp_path):
    (tmp_path / "train2017").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "train2017" / "a.jpg")
    ann = {"images": [{"id": 7, "file_name": "a.jpg"}],
           "annotations": [{"id": 1, "image_id": 7, "bbox": [3.5, 4, 10, 12], "iscrowd": 0},
                           {"id": 2, "image_id": 7, "bbox": [0, 0, 20, 20], "iscrowd": 1},
                           {"id": 3, "image_id": 7, "bbox": [0, 0, 2, 20], "iscrowd": 0}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps(ann))
    ds = DATASETS.get("coco_pairs")(root=str(tmp_path))
    assert len(ds) == 1 and ds[0].boxes.tolist() == [[3.5, 4, 10, 12]] and len(ds[0]) == 1
    ann["annotations"][0]["bbox"] = [1, 2]
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps(ann))
    with pytest.raises(CorruptFileError, match="annotation #0"):
        DATASETS.get("coco_pairs")(root=str(tmp_path))


# -- generator -------------------------------------------------------------------------------------------------------
def test_generator_is_deterministic_and_boxes_are_exact():
    a = render_sequence("train", 0, seed=5, config=TINY)
    b = render_sequence("train", 0, seed=5, config=TINY)
    c = render_sequence("train", 0, seed=6, config=TINY)
    assert all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames))
    assert np.array_equal(a.boxes, b.boxes) and not np.array_equal(a.boxes, c.boxes)
    W, H = TINY.frame_size
    checked = 0
    for k in range(TINY.num_frames):
        x, y, w, h = a.object_rects[k].astype(int)
        inside = x >= 0 and y >= 0 and x + w <= W and y + h <= H
        ox, oy, ow, oh = a.occluder_rects[k]
        overlap = ow > 0 and ox < x + w and x < ox + ow and oy < y + h and y < oy + oh
        if inside and not overlap:
            # the object's pixels are exactly at the box, and the box is the whole object
            assert np.array_equal(a.boxes[k], [x, y, w, h])
            assert np.array_equal(a.frames[k][y:y + h, x:x + w], a.object_patches[k])
            assert a.cover[k] == 8 and not a.absent[k]
            checked += 1
        if a.absent[k]:
            assert a.cover[k] == 0
    assert checked >= 5
    assert a.absent.any() and (a.cover < 8).any()  # out of view and occluded frames happen


def test_cover_bins_follow_got10k():
    assert [cover_bin(v) for v in (0.0, 0.01, 0.15, 0.16, 0.5, 0.9, 0.95, 1.0)] == [0, 1, 1, 2, 4, 6, 7, 8]


def test_generated_folder_reads_back_with_exact_labels(tmp_path):
    generate(tmp_path, "test", 2, seed=1, config=TINY, progress=False)
    ds = read_got10k(tmp_path, "test")
    for i, seq in enumerate(ds):
        ref = render_sequence("test", i, seed=1, config=TINY)
        np.testing.assert_array_equal(seq.boxes, ref.boxes)
        np.testing.assert_array_equal(seq.absent, ref.absent)
        np.testing.assert_array_equal(seq.cover, ref.cover)
        assert seq.frame_size() == TINY.frame_size and len(seq) == TINY.num_frames
        diff = np.abs(seq.load_frame(3).astype(int) - ref.frames[3].astype(int)).mean()
        assert diff < 6  # JPEG quality 95
    # train and test objects come from disjoint photos
    assert not set(OBJECT_PHOTOS["train"]) & set(OBJECT_PHOTOS["test"])
    assert render_sequence("test", 0, seed=1, config=TINY).info["object_photo"] in OBJECT_PHOTOS["test"]
    # regenerating with other parameters in the same folder is refused
    with pytest.raises(UserError, match="other parameters"):
        generate(tmp_path, "test", 3, seed=1, config=TINY, progress=False)


# -- crops -----------------------------------------------------------------------------------------------------------
def test_crop_round_trip_and_pixels_land_on_the_mapped_box():
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        box = np.array([rng.uniform(-20, 300), rng.uniform(-20, 200), rng.uniform(2, 120), rng.uniform(2, 120)])
        p = jittered_params(box, rng.uniform(1.5, 5), int(rng.integers(32, 400)), 0.25, 3.0, 1.0, g)
        other = rng.uniform(-50, 50, (7, 4))
        np.testing.assert_allclose(box_from_crop(box_to_crop(other, p), p), other, atol=1e-4)
        np.testing.assert_allclose(p.to_crop(p.to_frame(other)), other, atol=1e-4)
    img = np.zeros((120, 160, 3), np.uint8)
    img[30:70, 50:110] = 255
    box = np.array([50, 30, 60, 40.])
    for factor, size in ((2.0, 112), (4.0, 224), (5.0, 378)):
        crop, params = crop_around(img, box, factor, size)
        side = np.sqrt((60 + (factor - 1) * 50) * (40 + (factor - 1) * 50))
        assert params.scale[0] == pytest.approx(size / side)
        b = params.to_crop(box)
        np.testing.assert_allclose(b[:2] + b[2:] / 2, [size / 2, size / 2])  # centred
        ys, xs = np.nonzero(crop[..., 0] > 127)
        assert abs(xs.min() - b[0]) <= 1 and abs(xs.max() + 1 - (b[0] + b[2])) <= 1
        assert abs(ys.min() - b[1]) <= 1 and abs(ys.max() + 1 - (b[1] + b[3])) <= 1


def test_crop_pads_with_the_image_mean():
    img = np.zeros((50, 50, 3), np.uint8)
    img[:, :25] = 200  # mean 100
    crop, _ = crop_around(img, np.array([0, 0, 10, 10.]), 4.0, 64)
    assert crop[0, 0].tolist() == [100, 100, 100]


# -- pairs and the DataModule ----------------------------------------------------------------------------------------
def _solid_sequence(tmp_path: Path, n: int = 12, absent: list[int] = ()) -> TrackingSequence:
    """A red square moving right over a grey background."""
    frames, boxes = [], []
    for k in range(n):
        img = np.full((80, 100, 3), 90, np.uint8)
        x, y = 10 + 3 * k, 20
        img[y:y + 20, x:x + 20] = (255, 0, 0)
        path = tmp_path / f"{k:08d}.png"
        Image.fromarray(img).save(path)
        frames.append(path)
        boxes.append([x, y, 20, 20])
    flags = np.zeros(n, bool)
    flags[list(absent)] = True
    return TrackingSequence("solid", frames, np.array(boxes, float), flags, dataset="test")


def test_pair_sampler_is_seeded_per_epoch_and_index(tmp_path):
    seq = _solid_sequence(tmp_path)
    cfg = PairConfig(template_size=32, search_size=64)
    ds = TrackingPairDataset([[seq]], pairs_per_epoch=8, seed=3, config=cfg)
    again = TrackingPairDataset([[seq]], pairs_per_epoch=8, seed=3, config=cfg)
    a, b, c = ds[2], again[2], ds[8 + 2]  # key 10 = epoch 1, index 2
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["search"], c["search"])
    assert a["template"].shape == (3, 32, 32) and a["search"].shape == (3, 64, 64)


def test_pairs_skip_absent_frames_respect_the_gap_and_boxes_match_pixels(tmp_path):
    seq = _solid_sequence(tmp_path, n=12, absent=[0, 1, 2, 3, 8, 9])
    cfg = PairConfig(template_size=32, search_size=64, max_gap=2, flip_prob=0.0, color_jitter=0.0,
                     three_augment=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    ds = TrackingPairDataset([[seq]], pairs_per_epoch=40, seed=0, config=cfg)
    for i in range(40):
        _, t, s, _ = ds.draw(0, i)
        assert not seq.absent[t] and not seq.absent[s] and abs(t - s) <= 2
    for i in range(6):
        item = ds[i]
        # the template box is centred, with the context rule's size (f = 2: side sqrt(40 * 40) = 40 -> 20/40 of 32)
        np.testing.assert_allclose(item["template_box"].numpy(), [0.25, 0.25, 0.75, 0.75], atol=1e-6)
        red = (item["search"][0] > 0.7) & (item["search"][1] < 0.3)
        ys, xs = torch.nonzero(red, as_tuple=True)
        box = item["search_box"].numpy() * 64
        assert abs(xs.min().item() - box[0]) <= 1.5 and abs(xs.max().item() + 1 - box[2]) <= 1.5
        assert abs(ys.min().item() - box[1]) <= 1.5 and abs(ys.max().item() + 1 - box[3]) <= 1.5


def test_flip_mirrors_the_box(tmp_path):
    seq = _solid_sequence(tmp_path)
    base = {"template_size": 32, "search_size": 64, "color_jitter": 0.0, "three_augment": False, "scale_jitter": 0.0,
                "translation_jitter": 0.0}
    plain = TrackingPairDataset([[seq]], pairs_per_epoch=4, seed=0, config=PairConfig(flip_prob=0.0, **base))[1]
    flipped = TrackingPairDataset([[seq]], pairs_per_epoch=4, seed=0, config=PairConfig(flip_prob=1.0, **base))[1]
    x0, y0, x1, y1 = plain["search_box"].tolist()
    np.testing.assert_allclose(flipped["search_box"].numpy(), [1 - x1, y0, 1 - x0, y1], atol=1e-6)
    assert torch.allclose(flipped["search"], plain["search"].flip(-1), atol=1e-6)


def test_datamodule_batches_epochs_and_test_sequences(tmp_path):
    kwargs = {"num_frames": 30, "frame_size": [96, 72], "num_sequences": 2}
    spec = {"dataset": "tracking_synthetic", "root": str(tmp_path), "dataset_kwargs": kwargs}
    dm = TrackingPairDataModule(train=[{**spec, "split": "train"}], val={**spec, "split": "val"},
                                test={**spec, "split": "test"}, template_size=32, search_size=64,
                                pairs_per_epoch=8, val_pairs=4, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert batch["template"].shape == (4, 3, 32, 32) and batch["search"].shape == (4, 3, 64, 64)
    assert batch["template_box"].shape == (4, 4) and batch["search_box"].dtype == torch.float32
    assert ((batch["search_box"] >= 0) & (batch["search_box"] <= 1)).all()
    assert (batch["search_box"][:, 2:] > batch["search_box"][:, :2]).all()
    loader.sampler.set_epoch(1)  # Lightning calls this every epoch
    assert not torch.equal(next(iter(loader))["search"], batch["search"])
    val1, val2 = next(iter(dm.val_dataloader())), next(iter(dm.val_dataloader()))
    assert torch.equal(val1["search"], val2["search"])
    tests = dm.test_sequences()
    assert len(tests) == 2 and all(s.name.startswith("Synth_Test") for s in tests)
    with pytest.raises(ValueError, match="unknown keys"):
        TrackingPairDataModule(train=[{"dataset": "tracking_synthetic", "rot": "x"}])


def test_video_backgrounds_are_used_and_bad_videos_are_named(tmp_path):
    """Frames of a (GIF) video replace the photo background; photo-only output is unchanged by the option."""
    import imageio.v3 as iio

    from visadapt.data.tracking.synthetic import load_video

    video = np.stack([np.full((48, 64, 3), 40 * t, np.uint8) for t in range(6)])  # flat grey levels 0..200
    video[:, :, :, 2] = 7  # blue channel marks the video
    path = tmp_path / "clip.gif"
    iio.imwrite(path, video, loop=0)
    cfg = SyntheticConfig(num_frames=12, frame_size=(96, 72), occlusion_prob=0.0, out_of_view_prob=0.0,
                          max_distractors=0, background_videos=(str(path),), video_prob=1.0)
    seq = render_sequence("train", 0, seed=2, config=cfg)
    assert seq.info["background_photo"] == "video:clip.gif"
    outside = [f[_mask(seq, k)].astype(int) for k, f in enumerate(seq.frames)]
    assert all(np.abs(o[:, 2] - 7).max() <= 3 for o in outside)  # every background pixel comes from the video
    assert len({int(np.median(o[:, 0])) for o in outside}) > 1  # and it changes over time (the clip plays)
    # photo-only sequences are the same whether or not the option exists
    no_video = SyntheticConfig(num_frames=12, frame_size=(96, 72))
    assert np.array_equal(render_sequence("train", 0, 2, no_video).frames[3],
                          render_sequence("train", 0, 2, SyntheticConfig(num_frames=12, frame_size=(96, 72),
                                                                         video_prob=1.0)).frames[3])
    (tmp_path / "bad.mp4").write_bytes(b"xx")
    load_video.cache_clear()
    with pytest.raises(UserError, match="cannot decode background video .*bad.mp4"):
        load_video(str(tmp_path / "bad.mp4"))


def _mask(seq, k: int) -> np.ndarray:
    """Pixels outside the object's rectangle."""
    H, W = seq.frames[k].shape[:2]
    m = np.ones((H, W), bool)
    x, y, w, h = seq.object_rects[k].astype(int)
    m[max(y, 0):max(y + h, 0), max(x, 0):max(x + w, 0)] = False
    return m


def test_an_occluder_sweep_longer_than_a_short_sequence_is_cut():
    # a sweep lasts 12-24 frames; on 8-frame sequences its middle frame used to index past the end
    import dataclasses

    short = dataclasses.replace(TINY, num_frames=8, occlusion_prob=1.0, out_of_view_prob=0.0)
    for index in range(4):
        seq = render_sequence("train", index, seed=3, config=short)
        assert len(seq.frames) == 8 and seq.boxes.shape == (8, 4)
        assert (seq.occluder_rects[:, 2] > 0).any()  # the sweep happened
