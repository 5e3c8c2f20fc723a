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


def test_resumable_loader_keeps_dataloader_order_and_resumes_mid_epoch():
    import torch
    from torch.utils.data import DataLoader

    from visadapt.data.base import ResumableDataLoader

    data = list(range(10))
    torch.manual_seed(3)
    plain = [b.tolist() for b in DataLoader(data, batch_size=3, shuffle=True)]
    torch.manual_seed(3)
    loader = ResumableDataLoader(data, batch_size=3, shuffle=True)
    it = iter(loader)
    first = [next(it).tolist(), next(it).tolist()]
    state = loader.state_dict()
    rest = [b.tolist() for b in it]
    assert first + rest == plain  # the same order as DataLoader(shuffle=True) for the same global state
    after = torch.rand(3)  # what the run draws next
    torch.manual_seed(99)  # a resumed process starts from another random state
    resumed = ResumableDataLoader(data, batch_size=3, shuffle=True)
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == rest
    assert torch.equal(torch.rand(3), after)  # and the random state continues where the checkpoint left it
    assert [b.tolist() for b in resumed] != rest  # the next epoch draws a new order
