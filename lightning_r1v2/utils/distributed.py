"""Where a run stands in a distributed job: world size and rank, and its DeepSpeed config.

The strategy is recognised by class name (``DeepSpeedStrategy`` anywhere in its MRO, so subclasses
count), so these checks import neither deepspeed nor Lightning's strategy.
"""
from __future__ import annotations


def world_and_rank() -> tuple[int, int]:
    """(world size, rank) of the default process group; (1, 0) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def all_ranks(obj) -> list:
    """``obj`` of every rank, in rank order (``all_gather_object``, so collective when the world
    size is > 1: every rank must call it); ``[obj]`` without a process group."""
    world, _ = world_and_rank()
    if world == 1:
        return [obj]
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def deepspeed_config(trainer) -> dict | None:
    """The DeepSpeed config dict of ``trainer``'s strategy when it is a ``DeepSpeedStrategy``, else None.

    ``trainer`` may be None (a module outside a Trainer, or ``load_from_checkpoint``).
    """
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    if strategy is None or not any(c.__name__ == "DeepSpeedStrategy" for c in type(strategy).__mro__):
        return None
    config = getattr(strategy, "config", None)
    return config if isinstance(config, dict) else {}


def deepspeed_zero3_config(trainer) -> dict | None:
    """``deepspeed_config(trainer)`` when it runs ZeRO stage 3, else None."""
    config = deepspeed_config(trainer)
    if config is not None and (config.get("zero_optimization") or {}).get("stage") == 3:
        return config
    return None
