"""LightningModules of the three stages."""
from .common import PolicyModule
from .sft import SFTModule

__all__ = ["PolicyModule", "SFTModule"]
