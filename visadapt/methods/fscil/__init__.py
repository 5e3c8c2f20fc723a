"""Few-shot class-incremental learning (FSCIL) methods, one LightningModule each, in the :data:`FSCIL_METHODS`
registry: ``coact`` (:class:`CoACT`), ``frozen_class_mean`` and ``naive_lora_finetune`` (:mod:`.baselines`).
The session protocol that drives them is :mod:`visadapt.protocols.fscil`."""

from visadapt.methods.fscil.base import ClassifierHead, CoACTSGD, FSCILModel, FSCILModule, SessionInfo
from visadapt.methods.fscil.baselines import FrozenClassMean, NaiveLoRAFinetune
from visadapt.methods.fscil.coact import CoACT
from visadapt.methods.fscil.losses import supcon_loss
from visadapt.methods.fscil.registry import FSCIL_METHODS, register_fscil_method

__all__ = [
    "FSCIL_METHODS", "ClassifierHead", "CoACT", "CoACTSGD", "FSCILModel", "FSCILModule", "FrozenClassMean",
    "NaiveLoRAFinetune", "SessionInfo", "register_fscil_method", "supcon_loss",
]
