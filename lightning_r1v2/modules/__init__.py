"""LightningModules of the three stages."""
from .common import PolicyModule
from .grpo import GRPOModule
from .mpo import MPOModule
from .sft import SFTModule

__all__ = ["PolicyModule", "SFTModule", "MPOModule", "GRPOModule"]
