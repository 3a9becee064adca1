"""Backbones cut into units for the multi-exit network. Importing the package imports every module
in it, and so registers every backbone family in ``BACKBONES``: a new backbone is its module (and
its YAML in conf/backbone)."""

from eenn.models.backbones.base import BACKBONES, BackboneParts
from eenn.registry import import_submodules

import_submodules(__name__)

__all__ = ["BACKBONES", "BackboneParts"]
