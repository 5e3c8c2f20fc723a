import pytest

from visadapt.data import BadImageError, FewShotDataModule, create_dataset, load_image
from visadapt.data.fashion_mnist import fashion_mnist


def test_missing_fashion_mnist_root_names_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        fashion_mnist(root=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg and "apt-get install" in msg


def test_unknown_dataset_lists_available():
    with pytest.raises(ValueError, match="available: .*fashion_mnist"):
        FewShotDataModule("no_such_dataset")
    with pytest.raises(KeyError, match="available: .*procedural_shapes"):
        create_dataset("nope")


def test_corrupt_and_missing_image_files_are_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(BadImageError, match="broken.jpg"):
        load_image(bad)
    with pytest.raises(BadImageError, match="not found: .*nothere.png"):
        load_image(tmp_path / "nothere.png")


def test_fashion_mnist_real_files():
    ds = fashion_mnist(split="test")
    assert len(ds) == 10_000 and ds.num_classes == 10
    assert sorted(set(ds.labels)) == list(range(10))
    s = ds[0]
    assert s["image"].size == (28, 28) and s["classname"] == "Ankle boot"
    inv = fashion_mnist(split="test", invert=True)
    assert (inv.images[0].astype(int) + ds.images[0] == 255).all()
