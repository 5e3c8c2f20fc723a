"""One LightningModule per method family; importing this package makes short ``class_path`` names resolve."""

from visadapt.methods import companions  # noqa: F401  (fills the companion registries)
from visadapt.methods.base import AdapterModule, MissingCheckpointKeysError
from visadapt.methods.clip_fewshot import ClipFewShot
from visadapt.methods.decor import DreamBoothLoRA
from visadapt.methods.fscil import FSCIL_METHODS, CoACT, FrozenClassMean, NaiveLoRAFinetune
from visadapt.methods.manipshield import ManipShield
from visadapt.methods.lorat import LoRAT
from visadapt.methods.t2i_base import TextToImageBase

__all__ = ["FSCIL_METHODS", "AdapterModule", "ClipFewShot", "CoACT", "FrozenClassMean", "ManipShield", "LoRAT",
           "DreamBoothLoRA", "MissingCheckpointKeysError", "NaiveLoRAFinetune", "TextToImageBase"]
