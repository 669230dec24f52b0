"""Checkpoints that survive a crash, and the RNG streams that make a resume exact.

- ``AtomicCheckpointIO`` writes ``.<name>.<pid>.partial`` next to the target, fsyncs it, then
  ``os.replace``s it onto ``<name>``: a kill during a write leaves the previous checkpoint under
  its name, intact. The partial name ends in ``.partial`` and does not start with ``last``, so
  ``--ckpt_path last`` (which picks the newest ``last*.ckpt`` of the ModelCheckpoint folder) never
  resolves to it; partial files of dead processes are removed by the next save.
  (Lightning's own ``TorchCheckpointIO`` serialises into memory and then writes the final name in
  place: a kill during that write leaves a truncated ``last.ckpt``.) Use ModelCheckpoint's
  ``save_last: true``: ``last.ckpt`` is then a full save through this class, atomic too.
  ``save_last: link`` deletes ``last.ckpt`` and then makes a new symlink, so a kill in between
  leaves no ``last.ckpt`` and ``--ckpt_path last`` silently starts from scratch.
- ``rng_state()`` / ``set_rng_state()`` capture Python, NumPy and torch generators, which
  Lightning 2.6 does not restore on ``--ckpt_path``; the modules save them with every checkpoint
  and restore them when training restarts, so sampling continues exactly. The state is plain
  Python values and tensors, so checkpoints load under ``torch.load(weights_only=True)``, which is
  what Lightning uses by default with torch >= 2.6.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger("lightning_r1v2.checkpoint")

PARTIAL_SUFFIX = ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (temporary file, fsync, rename).

    Remote paths (``s3://`` and the like) go through Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path.parent)
        tmp = partial_path(path)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)  # make the rename itself durable


def partial_path(path: Path, pid: int | None = None) -> Path:
    """Where ``path`` is written before it is renamed: ``.<name>.<pid>.partial`` in the same folder."""
    return path.with_name(f".{path.name}.{os.getpid() if pid is None else pid}{PARTIAL_SUFFIX}")


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete partial checkpoint files left by processes that no longer run (killed mid-write)."""
    removed = []
    for p in folder.glob(f".*{PARTIAL_SUFFIX}"):
        try:
            pid = int(p.name[: -len(PARTIAL_SUFFIX)].rsplit(".", 1)[1])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
        log.warning("removed %s, a checkpoint write that process %d did not finish", p, pid)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict:
    """The global Python, NumPy, torch (and CUDA) generator states, as plain values and tensors."""
    return {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _numpy_state() -> tuple:
    # plain Python values only, so checkpoints load under torch.load(weights_only=True)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(cached))


def save_rng_states(checkpoint: dict) -> None:
    """Put this rank's generator states in ``checkpoint``, and every rank's in a multi-rank run.

    Lightning builds the checkpoint dict on every rank but (DDP, ZeRO-2) writes rank 0's: a
    rank-local entry alone would give every rank rank 0's streams on resume, and ranks whose
    sampling consumed their streams differently (generation stopping at different lengths) would
    sample differently from a run never stopped. Collective when the world size is > 1.
    """
    from .distributed import all_ranks

    checkpoint["r1v2_rng_state"] = rng_state()
    parts = all_ranks(checkpoint["r1v2_rng_state"])
    if len(parts) > 1:
        checkpoint["r1v2_rng_states"] = parts


def saved_rng_state(checkpoint: dict) -> dict | None:
    """This rank's generator states from a checkpoint written by ``save_rng_states`` (None: none saved)."""
    from .distributed import world_and_rank

    parts = checkpoint.get("r1v2_rng_states")
    if parts:
        _, rank = world_and_rank()
        if rank < len(parts):
            return parts[rank]
        log.warning("the checkpoint holds RNG states of %d ranks, this is rank %d: using rank 0's", len(parts), rank)
    return checkpoint.get("r1v2_rng_state")


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state()`` captured (the CUDA part only where CUDA is available)."""
    random.setstate(_as_python_state(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(state) -> tuple:
    # random.setstate needs (version, tuple_of_ints, gauss_next); a round trip may give lists
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def reopen_finished_epoch(checkpoint: dict, data_key: str) -> bool:
    """Let a resume from a checkpoint written on an epoch's last batch close that epoch normally.

    Lightning 2.6 resumes such a checkpoint (ModelCheckpoint's ``every_n_train_steps`` landing on
    the last batch) as if the epoch had already ended: ``on_train_epoch_end`` is never called for
    it (a buffer's epoch clearing, epoch-end monitors), nor ``on_train_epoch_start`` for the next,
    and the epoch counters drift from those of a run never stopped. With the saved
    ``is_last_batch`` flag cleared, the resumed loop asks the data for one more batch, finds the
    epoch exhausted and ends it through the usual hooks.

    Only when the checkpoint holds the position of a resumable sampler (``data_key``: the
    DataModule's entry with a ``sampler``): a plain loader would replay the epoch instead.
    Returns whether the checkpoint was changed.
    """
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    data = checkpoint.get(data_key)
    if not progress or not progress.get("is_last_batch") or not isinstance(data, dict) or not data.get("sampler"):
        return False
    progress["is_last_batch"] = False
    return True
