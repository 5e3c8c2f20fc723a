"""CoOp-format datasets, the ImageFolder layout and the prompt templates, on small fake datasets in tmp_path."""

import json

import numpy as np
import pytest
from PIL import Image

import visadapt.data.coop
import visadapt.data.imagefolder  # noqa: F401  (registers imagefolder)
from visadapt.data._registry import DATASETS
from visadapt.data.base import BadImageError
from visadapt.data.coop import LAYOUTS, CoOpDataset
from visadapt.data.templates import IMAGENET_ENSEMBLE_TEMPLATES, build_prompts, get_templates

COOP_NAMES = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
              "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"]


def write_png(path, value=0, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def fake_split_dataset(root, name, split_rows):
    """Write images and the split JSON of a JSON-based CoOp dataset; rows are (relpath, label, classname)."""
    layout = LAYOUTS[name]
    folder = root / layout.folder
    for rows in split_rows.values():
        for k, (rel, label, _) in enumerate(rows):
            write_png(folder / layout.image_dir / rel, value=10 * label + k)
    (folder / layout.split_file).write_text(json.dumps(split_rows))
    return folder


PETS = {
    "train": [["american_bulldog_1.jpg", 0, "american_bulldog"], ["abyssinian_1.jpg", 1, "abyssinian"],
              ["american_bulldog_2.jpg", 0, "american_bulldog"]],
    "val": [["abyssinian_2.jpg", 1, "abyssinian"]],
    "test": [["american_bulldog_3.jpg", 0, "american_bulldog"], ["abyssinian_3.jpg", 1, "abyssinian"]],
}


def test_all_coop_datasets_are_registered_with_the_common_signature():
    import inspect

    for name in [*COOP_NAMES, "imagefolder"]:
        assert name in DATASETS
        params = list(inspect.signature(DATASETS.get(name)).parameters)
        assert params[:4] == ["root", "split", "transform", "on_bad_image"], name  # imagefolder adds options after
    assert DATASETS.describe()["oxford_pets"].startswith("Oxford-IIIT Pets")


def test_split_json_read_through_registry(tmp_path):
    fake_split_dataset(tmp_path, "oxford_pets", PETS)
    train = DATASETS.get("oxford_pets")(root=str(tmp_path))
    assert isinstance(train, CoOpDataset) and train.split == "train" and len(train) == 3
    assert train.labels == [0, 1, 0]
    assert train.raw_classnames == ["american_bulldog", "abyssinian"]
    assert train.classnames == ["american bulldog", "abyssinian"]  # underscores -> spaces for prompts
    assert train.paths[1] == tmp_path / "oxford_pets" / "images" / "abyssinian_1.jpg"
    sample = train[2]
    assert sample["label"] == 0 and sample["classname"] == "american bulldog" and sample["image"].size == (8, 8)
    assert np.asarray(sample["image"])[0, 0, 0] == 2  # the third train image (value 10 * label + k)
    test = DATASETS.get("oxford_pets")(root=str(tmp_path), split="test")
    assert test.labels == [0, 1] and test.classnames == train.classnames
    # root may also be the dataset folder itself
    val = DATASETS.get("oxford_pets")(root=str(tmp_path / "oxford_pets"), split="val")
    assert len(val) == 1 and val.describe(0).endswith("abyssinian_2.jpg")
    assert train.template == "a photo of a {}, a type of pet."


def test_class_names_cover_all_splits_and_conflicts_fail(tmp_path):
    rows = {"train": [["a/1.jpg", 0, "Apply_Eye_Makeup"]], "val": [],
            "test": [["a/2.jpg", 0, "Apply_Eye_Makeup"], ["b/1.jpg", 1, "Band_Marching"]]}
    fake_split_dataset(tmp_path, "ucf101", rows)
    train = DATASETS.get("ucf101")(root=str(tmp_path))
    assert train.num_classes == 2 and train.classnames == ["Apply Eye Makeup", "Band Marching"]
    rows["val"] = [["b/2.jpg", 1, "Baseball_Pitch"]]
    fake_split_dataset(tmp_path, "ucf101", rows)
    with pytest.raises(ValueError, match="label 1 is called both"):
        DATASETS.get("ucf101")(root=str(tmp_path))


def test_eurosat_names_expanded_only_when_raw(tmp_path):
    raw = {"train": [["AnnualCrop/AnnualCrop_1.jpg", 0, "AnnualCrop"], ["SeaLake/SeaLake_1.jpg", 1, "SeaLake"]],
           "val": [], "test": []}
    fake_split_dataset(tmp_path / "a", "eurosat", raw)
    assert DATASETS.get("eurosat")(root=str(tmp_path / "a")).classnames == ["Annual Crop Land", "Sea or Lake"]
    final = {"train": [["AnnualCrop/AnnualCrop_1.jpg", 0, "Annual Crop Land"]], "val": [], "test": []}
    fake_split_dataset(tmp_path / "b", "eurosat", final)
    assert DATASETS.get("eurosat")(root=str(tmp_path / "b")).classnames == ["Annual Crop Land"]


def test_stanford_cars_paths_are_relative_to_the_dataset_folder(tmp_path):
    rows = {"train": [["cars_train/00001.jpg", 0, "2012 Tesla Model S"]], "val": [],
            "test": [["cars_test/00001.jpg", 0, "2012 Tesla Model S"]]}
    fake_split_dataset(tmp_path, "stanford_cars", rows)
    ds = DATASETS.get("stanford_cars")(root=str(tmp_path), split="test")
    assert ds.paths == [tmp_path / "stanford_cars" / "cars_test" / "00001.jpg"]
    assert ds[0]["classname"] == "2012 Tesla Model S"


def test_imagenet_layout_val_is_test(tmp_path):
    base = tmp_path / "imagenet"
    (base / "classnames.txt").parent.mkdir(parents=True)
    (base / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n")
    write_png(base / "images/train/n01443537/b.JPEG", 1)
    write_png(base / "images/train/n01443537/a.JPEG", 2)
    write_png(base / "images/train/n01484850/c.JPEG", 3)
    (base / "images/train/n01484850/notes.txt").write_text("not an image")
    write_png(base / "images/val/n01440764/v.JPEG", 4)
    train = DATASETS.get("imagenet")(root=str(tmp_path))
    assert train.classnames == ["tench", "goldfish", "great white shark"]
    assert train.labels == [1, 1, 2]  # classnames.txt order, files sorted, non-images ignored
    assert [p.name for p in train.paths] == ["a.JPEG", "b.JPEG", "c.JPEG"]
    val, test = (DATASETS.get("imagenet")(root=str(tmp_path), split=s) for s in ("val", "test"))
    assert val.paths == test.paths == [base / "images/val/n01440764/v.JPEG"] and test.labels == [0]
    (base / "images/val/n09999999").mkdir()
    with pytest.raises(ValueError, match=r"n09999999 is not listed in .*classnames\.txt"):
        DATASETS.get("imagenet")(root=str(tmp_path), split="test")


def test_fgvc_aircraft_variant_files(tmp_path):
    base = tmp_path / "fgvc_aircraft"
    base.mkdir()
    (base / "variants.txt").write_text("707-320\nA300B4\nF-16A/B\n")
    (base / "images_variant_train.txt").write_text("1025794 F-16A/B\n0034309 707-320\n")
    (base / "images_variant_test.txt").write_text("2222222 A300B4\n")
    for image_id in ("1025794", "0034309", "2222222"):
        write_png(base / "images" / f"{image_id}.jpg")
    train = DATASETS.get("fgvc_aircraft")(root=str(tmp_path))
    assert train.labels == [2, 0] and train.classnames == ["707-320", "A300B4", "F-16A/B"]
    assert train.paths[0] == base / "images" / "1025794.jpg"
    assert DATASETS.get("fgvc_aircraft")(root=str(tmp_path), split="test").labels == [1]
    with pytest.raises(FileNotFoundError, match=r"images_variant_val\.txt"):
        DATASETS.get("fgvc_aircraft")(root=str(tmp_path), split="val")


@pytest.mark.parametrize("name", COOP_NAMES)
def test_missing_root_names_the_expected_layout(tmp_path, name):
    layout = LAYOUTS[name]
    with pytest.raises(FileNotFoundError) as e:
        DATASETS.get(name)(root=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert name in msg and str(tmp_path / "nowhere") in msg and f"{layout.folder}/" in msg
    if layout.split_file:
        assert layout.split_file in msg and f"{layout.folder}/{layout.image_dir}" in msg
    with pytest.raises(ValueError, match="split must be one of"):
        DATASETS.get(name)(root=str(tmp_path), split="trainval")


def test_corrupt_image_raises_or_is_skipped(tmp_path):
    folder = fake_split_dataset(tmp_path, "oxford_pets", PETS)
    bad = folder / "images" / "abyssinian_1.jpg"
    bad.write_bytes(b"\x00garbage, not a jpeg")
    ds = DATASETS.get("oxford_pets")(root=str(tmp_path))
    with pytest.raises(BadImageError, match=r"abyssinian_1\.jpg"):
        ds[1]
    skipping = DATASETS.get("oxford_pets")(root=str(tmp_path), on_bad_image="skip")
    assert len(skipping) == len(ds) - 1  # left out of the index, never replaced by another sample
    assert "abyssinian_1.jpg" not in [p.name for p in skipping.paths]
    assert len(skipping.skipped) == 1 and "abyssinian_1.jpg" in skipping.skipped[0]
    assert [skipping[i]["label"] for i in range(len(skipping))] == [skipping.labels[i] for i in range(len(skipping))]


def test_transform_is_applied(tmp_path):
    fake_split_dataset(tmp_path, "dtd", {"train": [["banded/1.jpg", 0, "banded"]], "val": [], "test": []})
    ds = DATASETS.get("dtd")(root=str(tmp_path), transform=lambda im: im.size)
    assert ds[0]["image"] == (8, 8) and ds.template == "{} texture."


def test_imagefolder_single_and_split_layouts(tmp_path):
    single = tmp_path / "single"
    write_png(single / "tabby_cat/1.png")
    write_png(single / "dog/x/2.png")  # nested below the class folder
    write_png(single / "dog/3.jpg")
    (single / "dog/readme.md").write_text("skip me")
    ds = DATASETS.get("imagefolder")(root=str(single))
    assert ds.raw_classnames == ["dog", "tabby_cat"] and ds.classnames == ["dog", "tabby cat"]
    assert ds.labels == [0, 0, 1] and [p.name for p in ds.paths] == ["3.jpg", "2.png", "1.png"]

    split = tmp_path / "split"
    write_png(split / "train/a/1.png")
    write_png(split / "train/b/1.png")
    write_png(split / "test/b/2.png")
    write_png(split / "test/c/3.png")
    train = DATASETS.get("imagefolder")(root=str(split), split="train")
    test = DATASETS.get("imagefolder")(root=str(split), split="test")
    assert train.classnames == test.classnames == ["a", "b", "c"]  # union: labels agree across splits
    assert train.labels == [0, 1] and test.labels == [1, 2]
    with pytest.raises(FileNotFoundError, match="no split folder .*val"):
        DATASETS.get("imagefolder")(root=str(split), split="val")
    with pytest.raises(FileNotFoundError, match="root/<class>/<image>"):
        DATASETS.get("imagefolder")(root=str(tmp_path / "missing"))


def test_templates_per_dataset():
    assert get_templates("eurosat") == ["a centered satellite photo of {}."]
    assert get_templates("EuroSAT") == get_templates("eurosat")  # CoOp spelling accepted
    assert get_templates("DescribableTextures") == ["{} texture."]
    assert get_templates("food101") == ["a photo of {}, a type of food."]
    assert get_templates("ucf101") == ["a photo of a person doing {}."]
    assert get_templates("fashion_mnist") == ["a photo of a {}."]
    assert get_templates("something_else") == get_templates(None) == ["a photo of a {}."]
    assert get_templates("imagenet", ensemble=True) == list(IMAGENET_ENSEMBLE_TEMPLATES)
    assert len(IMAGENET_ENSEMBLE_TEMPLATES) == 7
    pets = get_templates("oxford_pets", ensemble=True)
    assert pets[:7] == list(IMAGENET_ENSEMBLE_TEMPLATES) and pets[7] == "a photo of a {}, a type of pet."
    for name in COOP_NAMES:
        assert get_templates(name)[0].count("{}") == 1
    assert build_prompts(["american_bulldog"], get_templates("oxford_pets")[0]) == [
        "a photo of a american bulldog, a type of pet."]


def test_fashion_mnist_names_and_template():
    from visadapt.data.templates import FASHION_MNIST_CLASSNAMES

    prompts = build_prompts(list(FASHION_MNIST_CLASSNAMES), get_templates("fashion_mnist")[0])
    assert prompts[0] == "a photo of a T-shirt/top." and prompts[9] == "a photo of a Ankle boot."


def test_generic_coop_split_dataset_reads_any_split_file(tmp_path):
    """A user's own dataset in CoOp's format: class names from the file, the image folder found by itself."""
    rows = {"train": [["cats/a.png", 1, "tabby_cat"], ["dogs/b.png", 0, "golden_retriever"],
                      ["cats/c.png", 1, "tabby_cat"]],
            "val": [["dogs/d.png", 0, "golden_retriever"]],
            "test": [["cats/e.png", 1, "tabby_cat"], ["misc/f.png", 2, "axolotl"]]}
    folder = tmp_path / "my_pets"
    for k, (rel, label, _) in enumerate(r for split in rows.values() for r in split):
        write_png(folder / "pictures" / rel, value=10 * label + k)
    (folder / "split_zhou_MyPets.json").write_text(json.dumps(rows))
    assert "coop_split" in DATASETS.names()
    train = DATASETS.get("coop_split")(root=str(folder))
    assert isinstance(train, CoOpDataset)
    assert train.classnames == ["golden retriever", "tabby cat", "axolotl"]  # from the file, by label
    assert train.raw_classnames == ["golden_retriever", "tabby_cat", "axolotl"]
    assert train.labels == [1, 0, 1]
    assert train.paths[0] == folder / "pictures" / "cats/a.png"  # the image folder was found
    assert train[0]["image"].size == (8, 8)
    test = DATASETS.get("coop_split")(root=str(folder / "split_zhou_MyPets.json"), split="test")
    assert test.labels == [1, 2] and test.classnames == train.classnames
    assert train.template == "a photo of a {}."  # an unknown name gets the generic template
    eurosat = DATASETS.get("coop_split")(root=str(folder), name="EuroSAT")
    assert eurosat.template == "a centered satellite photo of {}."
    explicit = DATASETS.get("coop_split")(root=str(folder), image_dir="pictures", split="val")
    assert explicit.paths == [folder / "pictures/dogs/d.png"]
    # clear errors
    with pytest.raises(FileNotFoundError, match="image_dir"):
        DATASETS.get("coop_split")(root=str(folder), image_dir="nope")
    (folder / "split_zhou_Other.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="several split files"):
        DATASETS.get("coop_split")(root=str(folder))
    assert DATASETS.get("coop_split")(root=str(folder), split_file="split_zhou_Other.json").labels == [1, 0, 1]
    with pytest.raises(FileNotFoundError, match="split_zhou"):
        DATASETS.get("coop_split")(root=str(tmp_path / "empty_dir_missing"))


def test_generic_coop_split_feeds_the_datamodule(tmp_path):
    from visadapt.data import FewShotDataModule

    rows = {s: [[f"{s}/{c}_{k}.png", c, f"class_{c}"] for c in (1, 0) for k in range(n)]
            for s, n in (("train", 5), ("val", 2), ("test", 3))}
    for split in rows.values():
        for rel, label, _ in split:
            write_png(tmp_path / "imgs" / rel, value=label)
    (tmp_path / "split_zhou_Toy.json").write_text(json.dumps(rows))
    dm = FewShotDataModule("coop_split", root=str(tmp_path), shots=2, val_split="val")
    dm.setup()
    assert dm.classnames == ["class 0", "class 1"] and len(dm.train_set) == 4 and len(dm.val_set) == 4
    assert dm.val_source == "val split"
