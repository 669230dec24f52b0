"""DeepSpeed strategies: checkpoint folders that appear whole or not at all, and DeepSpeed on CPUs.

``AtomicDeepSpeedStrategy``: Lightning's ``DeepSpeedStrategy`` writes a checkpoint in place
(``DeepSpeedEngine.save_checkpoint(filepath, tag="checkpoint")``: every rank overwrites its shard
files in ``filepath/checkpoint/``). A job killed during a save (preemption, time limit: a 38B save
takes minutes) leaves ``last.ckpt/`` with some ranks' new shards and others' old ones, or half a
file; the resume then fails or loads a mix of two steps. This subclass has every rank write into
``.<name>.partial/`` beside the target, waits for all of them, then rank 0 swaps the folder in:
with Linux's ``renameat2(RENAME_EXCHANGE)`` in one atomic step (the old checkpoint lands in the
staging name and is deleted); where the file system refuses that, with two renames (the old one
is kept as ``.<name>.old`` until the new one is in place). ``--ckpt_path last`` never matches
the hidden names (``ModelCheckpoint._find_last_checkpoints`` wants names starting with ``last``).

``CPUDeepSpeedStrategy``: the same on CPUs, to rehearse a ZeRO run on a laptop.

Lightning refuses DeepSpeed without CUDA (``DeepSpeedStrategy.setup_environment``: "The DeepSpeed
strategy is only supported on CUDA GPUs"), and DeepSpeed reads each rank's device index from
Lightning's root device, which has no index on a CPU. DeepSpeed itself runs on CPUs through its CPU
accelerator (chosen automatically without a GPU, or with ``DS_ACCELERATOR=cpu``) and gloo. This
subclass bypasses only those two points, so everything else is the code path of a GPU run: the
engine's set-up, ZeRO-2/3 partitioning across ranks, the collectives of a partitioned ``generate``,
manual optimization, sharded checkpoint folders and resuming from them.

For rehearsal and tests, not for speed (``configs/tiny/grpo_zero3_cpu.yaml``)::

    torchrun --nproc_per_node 2 cli.py fit --config configs/tiny/grpo.yaml --config configs/tiny/grpo_zero3_cpu.yaml

Checked against Lightning 2.6.6 and DeepSpeed 0.19.8.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
from pathlib import Path

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy

from .utils.checkpoint import fsync_dir

log = logging.getLogger("lightning_r1v2.strategies")


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` whose checkpoint folders are swapped in whole. Same arguments.

    Costs one extra directory rename per save; needs the checkpoint folder's file system to be
    shared by all ranks (as DeepSpeed's own sharded save does). Remote paths (``s3://``) are
    saved by the parent, in place.
    """

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if storage_options is not None or "://" in str(filepath):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        target = Path(self.broadcast(str(filepath)))
        staging = target.with_name(f".{target.name}.partial")
        if self.is_global_zero:
            shutil.rmtree(staging, ignore_errors=True)  # a save that was killed
        self.barrier("atomic_save_start")
        super().save_checkpoint(checkpoint, str(staging))
        self.barrier("atomic_save_written")  # every rank's shard is on disk
        if self.is_global_zero:
            swap_in(staging, target)
        self.barrier("atomic_save_done")


def swap_in(staging: Path, target: Path) -> str:
    """Put the folder ``staging`` at ``target``; returns how: ``rename``, ``exchange`` or ``two renames``."""
    if not target.exists() and not target.is_symlink():
        os.replace(staging, target)
        how = "rename"
    elif _rename_exchange(staging, target):
        _remove(staging)
        how = "exchange"
    else:
        old = target.with_name(f".{target.name}.old")
        _remove(old)
        os.replace(target, old)  # a kill between these two renames leaves the old one here
        os.replace(staging, target)
        _remove(old)
        how = "two renames"
    fsync_dir(target.parent)
    log.debug("checkpoint %s swapped in (%s)", target, how)
    return how


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False if unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class CPUDeepSpeedStrategy(AtomicDeepSpeedStrategy):
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


__all__ = ["AtomicDeepSpeedStrategy", "CPUDeepSpeedStrategy", "swap_in"]
