"""One LightningModule per method family; importing this package makes short ``class_path`` names resolve."""

from visadapt.methods.base import AdapterModule, MissingCheckpointKeysError
from visadapt.methods.clip_fewshot import ClipFewShot

__all__ = ["AdapterModule", "ClipFewShot", "MissingCheckpointKeysError"]
