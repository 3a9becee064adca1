from eenn.models.backbones import alexnet, cifar_resnet, densenet, lenet, msdnet, timm_backbone  # noqa: F401  (register the factories)
from eenn.models.backbones.base import BACKBONES, BackboneParts

__all__ = ["BACKBONES", "BackboneParts"]
