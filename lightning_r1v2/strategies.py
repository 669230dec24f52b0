"""``CPUDeepSpeedStrategy``: Lightning's DeepSpeed strategy on CPUs, to rehearse a ZeRO run on a laptop.

Lightning refuses DeepSpeed without CUDA (``DeepSpeedStrategy.setup_environment``: "The DeepSpeed
strategy is only supported on CUDA GPUs"), and DeepSpeed reads each rank's device index from
Lightning's root device, which has no index on a CPU. DeepSpeed itself runs on CPUs through its CPU
accelerator (chosen automatically without a GPU, or with ``DS_ACCELERATOR=cpu``) and gloo. This
subclass bypasses only those two points, so everything else is the code path of a GPU run: the
engine's set-up, ZeRO-2/3 partitioning across ranks, the collectives of a partitioned ``generate``,
manual optimization, sharded checkpoint folders and resuming from them.

For rehearsal and tests, not for speed (``configs/tiny/zero3_cpu.yaml``)::

    torchrun --nproc_per_node 2 cli.py fit --config configs/tiny/grpo.yaml --config configs/tiny/zero3_cpu.yaml

Checked against Lightning 2.6.6 and DeepSpeed 0.19.8.
"""
from __future__ import annotations

import os

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` that runs on ``accelerator: cpu`` (gloo). Same arguments.

    Use it with ``precision: 32-true`` (DeepSpeed's CPU accelerator has no fp16 loss scaling; bf16
    works but is slow on most CPUs).
    """

    def __init__(self, *args, **kwargs):
        # DeepSpeed picks its accelerator once, at its first use; without a GPU it picks "cpu" anyway
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # the parent's only addition is the CUDA check

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)  # DeepSpeed takes its device index from root_device.index

    def setup_distributed(self) -> None:
        # the parent's, without _validate_device_index_selection (CPU devices have no index)
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


__all__ = ["CPUDeepSpeedStrategy"]
