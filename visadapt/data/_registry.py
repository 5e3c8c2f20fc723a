"""The dataset registry: name -> builder ``(root=..., split=..., transform=..., **kwargs) -> Dataset``."""

from visadapt.registry import Registry

DATASETS: Registry = Registry("dataset")
register_dataset = DATASETS.register
