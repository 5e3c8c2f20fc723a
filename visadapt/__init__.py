"""visadapt: low-rank adaptation of vision and multimodal foundation models."""

__version__ = "0.1.0"
