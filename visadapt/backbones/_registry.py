"""The backbone registry: name -> builder returning a :class:`~visadapt.backbones.base.Backbone`."""

from visadapt.registry import Registry

BACKBONES: Registry = Registry("backbone")
register_backbone = BACKBONES.register
