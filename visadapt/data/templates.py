"""Prompt templates and class-name lists for zero-shot and few-shot classification with dual encoders.

The per-dataset templates are CoOp's (``trainers/zsclip.py``); the 7-template ensemble is CoOp's selection of CLIP's
ImageNet templates. CoOp's ensemble mode uses those 7 for ImageNet and adds the dataset's own template for every
other dataset; :func:`get_templates` does the same.

Templates hold one ``{}`` for the class name. Class names are written with spaces (:func:`prompt_name` turns the
underscores of split-file names into spaces, as CoOp's trainers do).
"""

from __future__ import annotations

from visadapt.data.fashion_mnist import FASHION_MNIST_CLASSES

DEFAULT_TEMPLATE = "a photo of a {}."

DATASET_TEMPLATES: dict[str, str] = {
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    # not a CoOp dataset: the plain template, which gives the reference DeViSE zero-shot number (31%)
    "fashion_mnist": "a photo of a {}.",
    # not a CoOp dataset: CLIP's MNIST prompt, for scikit-learn's digits (class names "0".."9")
    "digits": 'a photo of the number: "{}".',
}
"""visadapt dataset name -> CoOp's hand-written template (``CUSTOM_TEMPLATES``)."""

IMAGENET_ENSEMBLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
"""CoOp's ``IMAGENET_TEMPLATES_SELECT`` (wording kept as published, including "a origami")."""

COOP_NAMES: dict[str, str] = {
    "ImageNet": "imagenet", "ImageNetSketch": "imagenet_sketch", "ImageNetV2": "imagenet_v2",
    "ImageNetA": "imagenet_a", "ImageNetR": "imagenet_r", "Caltech101": "caltech101", "OxfordPets": "oxford_pets",
    "StanfordCars": "stanford_cars", "OxfordFlowers": "oxford_flowers", "Food101": "food101",
    "FGVCAircraft": "fgvc_aircraft", "SUN397": "sun397", "DescribableTextures": "dtd", "EuroSAT": "eurosat",
    "UCF101": "ucf101",
}
"""CoOp / Dassl dataset class names -> visadapt registry names, so that either spelling works."""

FASHION_MNIST_CLASSNAMES: tuple[str, ...] = tuple(FASHION_MNIST_CLASSES)
"""Fashion-MNIST's labels 0..9 as its authors name them (defined in :mod:`visadapt.data.fashion_mnist`)."""


def canonical_name(dataset_name: str) -> str:
    """The visadapt name of a dataset from its visadapt or its CoOp spelling (``"EuroSAT"`` -> ``"eurosat"``)."""
    return COOP_NAMES.get(dataset_name, dataset_name.lower().replace("-", "_"))


def get_templates(dataset_name: str | None = None, ensemble: bool = False) -> list[str]:
    """Prompt templates for ``dataset_name``.

    Args:
        dataset_name: visadapt or CoOp dataset name; unknown names (and ``None``) get :data:`DEFAULT_TEMPLATE`.
        ensemble: CoOp's prompt ensemble: the 7 ImageNet templates, plus the dataset's own template for datasets
            other than ImageNet.

    Returns:
        A list of templates, each with one ``{}``.
    """
    name = canonical_name(dataset_name) if dataset_name else None
    own = DATASET_TEMPLATES.get(name, DEFAULT_TEMPLATE) if name else DEFAULT_TEMPLATE
    if not ensemble:
        return [own]
    templates = list(IMAGENET_ENSEMBLE_TEMPLATES)
    if name != "imagenet":
        templates.append(own)
    return templates


def prompt_name(classname: str) -> str:
    """Class name as it goes into a prompt: underscores become spaces (``"great_pyrenees"`` -> ``"great pyrenees"``)."""
    return classname.replace("_", " ")


def build_prompts(classnames: list[str], template: str) -> list[str]:
    """One prompt per class: ``template.format(prompt_name(c))``."""
    return [template.format(prompt_name(c)) for c in classnames]
