"""Pure metric functions: top-1, harmonic mean, the FSCIL session table."""

from visadapt.metrics.classification import harmonic_mean, top1

__all__ = ["harmonic_mean", "top1"]
