"""Dataset readers on small generated files: CIFAR-100 pickles (and a malicious one), miniImageNet and CUB folders."""

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from visadapt.data._registry import DATASETS
from visadapt.data.cifar import UnsafePickleError, safe_load_pickle
from visadapt.data.sessions import read_cec_index_files


def _fake_cifar100(root, n_train=6, n_test=4, protocol=2):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        entry = {"filenames": [f"img{i}.png" for i in range(n)], "fine_labels": [i % 3 for i in range(n)],
                 "coarse_labels": [0] * n, "data": data, "batch_label": f"{split} batch"}
        (folder / split).write_bytes(pickle.dumps(entry, protocol=protocol))
    meta = {"fine_label_names": ["apple", "aquarium_fish", "baby"], "coarse_label_names": ["x"]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return data


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar100_reader_on_fake_batches(tmp_path, protocol):
    test_data = _fake_cifar100(tmp_path, protocol=protocol)
    ds = DATASETS.get("cifar100")(root=str(tmp_path), split="test")
    assert len(ds) == 4 and ds.labels == [0, 1, 2, 0] and ds.classnames == ["apple", "aquarium_fish", "baby"]
    img = ds.load(1)
    assert img.size == (32, 32) and img.mode == "RGB"
    # channel-major rows (R plane, G plane, B plane) -> HWC pixels
    expected = test_data[1].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(img), expected)
    # the inner folder itself is accepted as root
    assert len(DATASETS.get("cifar100")(root=str(tmp_path / "cifar-100-python"), split="train")) == 6


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(pickle.dumps({"data": Exploit()}, protocol=2))
    with pytest.raises(UnsafePickleError, match="system"):
        DATASETS.get("cifar100")(root=str(tmp_path), split="train")
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        safe_load_pickle(pickle.dumps(_Eval(), protocol=4))
    assert not marker.exists()


class _Eval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_missing_roots_name_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/\{train,test,meta\}"):
        DATASETS.get("cifar100")(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"split/train.csv"):
        DATASETS.get("mini_imagenet")(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"images.txt, train_test_split.txt"):
        DATASETS.get("cub200")(root=str(tmp_path))


def _jpg(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_mini_imagenet_layout_and_cec_paths(tmp_path):
    base = tmp_path / "miniimagenet"
    wnids = ["n02", "n01"]  # sorted order decides the labels: n01 -> 0, n02 -> 1
    rows = {"train": [], "test": []}
    for w in wnids:
        for i in range(4):
            name = f"{w}000000{i:02d}.jpg"
            _jpg(base / "images" / name, 10 * i)
            rows["train" if i < 3 else "test"].append(f"{name},{w}")
    (base / "split").mkdir()
    for split, lines in rows.items():
        (base / "split" / f"{split}.csv").write_text("filename,label\n" + "\n".join(lines) + "\n")
    train = DATASETS.get("mini_imagenet")(root=str(tmp_path), split="train")
    test = DATASETS.get("mini_imagenet")(root=str(base), split="test")
    assert train.classnames == ["n01", "n02"] and train.labels == [1, 1, 1, 0, 0, 0] and test.labels == [1, 0]
    assert train.load(0).size == (8, 8)
    idx = tmp_path / "index"
    idx.mkdir()
    (idx / "session_1.txt").write_text("MINI-ImageNet/train/n01/n0100000000.jpg\n"
                                       "MINI-ImageNet/train/n01/n0100000001.jpg\n")
    (idx / "session_2.txt").write_text("MINI-ImageNet/train/n02/n0200000002.jpg\n")
    split = read_cec_index_files(idx, train, "mini_imagenet")
    assert split.session_classes == [[0], [1]] and split.train == [[3, 4], [2]]


def test_cub_layout(tmp_path):
    base = tmp_path / "CUB_200_2011" / "CUB_200_2011"  # CoACT's double nesting
    images, split, labels = [], [], []
    k = 0
    for c, cls in enumerate(["001.Black_footed_Albatross", "002.Laysan_Albatross"], 1):
        for i in range(3):
            k += 1
            rel = f"{cls}/{cls.split('.')[1]}_{i:04d}.jpg"
            _jpg(base / "images" / rel, 40 * i)
            images.append(f"{k} {rel}")
            split.append(f"{k} {1 if i < 2 else 0}")
            labels.append(f"{k} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    train = DATASETS.get("cub200")(root=str(tmp_path), split="train")
    test = DATASETS.get("cub200")(root=str(tmp_path), split="test")
    assert train.labels == [0, 0, 1, 1] and test.labels == [0, 1]
    assert train.classnames == ["Black footed Albatross", "Laysan Albatross"]
    assert train.describe(2).endswith("002.Laysan_Albatross/Laysan_Albatross_0000.jpg")
