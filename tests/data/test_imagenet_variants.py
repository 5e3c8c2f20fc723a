"""ImageNet-V2 / -Sketch / -A / -R readers (CoOp layout) on small fake folders in tmp_path."""

import numpy as np
import pytest
from PIL import Image

from visadapt.data import DATASETS

WNIDS = ["n01", "n02", "n03", "n04", "n05"]
NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]


def png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


def classnames_txt(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, NAMES)))


def test_v2_folders_are_label_indices(tmp_path):
    ds_dir = tmp_path / "imagenetv2"
    classnames_txt(ds_dir)
    for label in range(5):
        for j in range(2):
            png(ds_dir / "imagenetv2-matched-frequency-format-val" / str(label) / f"{j}.jpeg", label * 10 + j)
    ds = DATASETS.get("imagenet_v2")(root=str(tmp_path))
    assert len(ds) == 10 and ds.classnames == NAMES
    assert ds.labels == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert np.asarray(ds.load(5))[0, 0, 0] == 21  # folder 2, second image


def test_a_and_r_keep_only_present_classes_in_classnames_order(tmp_path):
    for name, folder, sub in (("imagenet_a", "imagenet-adversarial", "imagenet-a"),
                              ("imagenet_r", "imagenet-rendition", "imagenet-r")):
        ds_dir = tmp_path / folder
        classnames_txt(ds_dir)
        for wnid in ("n04", "n02"):  # 2 of the 5 classes
            png(ds_dir / sub / wnid / "a.jpg", 1)
        ds = DATASETS.get(name)(root=str(ds_dir))  # root may be the dataset folder itself
        assert ds.classnames == ["goldfish", "tiger shark"]  # relabelled 0..1, classnames.txt order
        assert sorted(ds.labels) == [0, 1]
        assert ds.classnames[ds.labels[ds.paths.index(ds_dir / sub / "n04" / "a.jpg")]] == "tiger shark"


def test_sketch_maps_wnids_and_bad_layouts_are_named(tmp_path):
    ds_dir = tmp_path / "imagenet-sketch"
    classnames_txt(ds_dir)
    for wnid in WNIDS:
        png(ds_dir / "images" / wnid / "s.JPEG", 3)
    ds = DATASETS.get("imagenet_sketch")(root=str(tmp_path))
    assert ds.classnames == NAMES and ds.labels == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="test set only"):
        DATASETS.get("imagenet_sketch")(root=str(tmp_path), split="train")
    png(ds_dir / "images" / "n99" / "x.jpg", 0)
    with pytest.raises(ValueError, match="n99"):
        DATASETS.get("imagenet_sketch")(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="imagenet-rendition/imagenet-r"):
        DATASETS.get("imagenet_r")(root=str(tmp_path))
