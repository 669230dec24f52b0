"""The buffer's checkpoint state in a 2-rank run: every rank's rows saved, each rank gets its own back.

Two CPU processes (gloo). Lightning writes the checkpoint from rank 0 only, but calls
``state_dict`` on every rank; the buffer gathers all ranks' parts there.
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_buffer import EFF, ZERO, make_rollouts, trainer_at, uids  # noqa: E402

from lightning_r1v2.callbacks.buffer import SelectiveSampleBuffer  # noqa: E402


def _worker(rank: int, world: int, init_file: str, out_dir: str):
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ssb = SelectiveSampleBuffer(capacity=16, seed=3)
        ssb.setup(type("T", (), {"global_rank": rank})(), None, "fit")  # rank r draws with seed + r
        ssb.on_advantages(trainer_at(0), None, make_rollouts(EFF + ZERO, tag=rank + 1))  # rank-own rows
        state = ssb.state_dict()  # collective
        if rank == 0:
            torch.save(state, Path(out_dir) / "ssb.pt")
        expected = ssb.on_advantages(trainer_at(1), None, make_rollouts(ZERO * 2, tag=9))  # what follows
        dist.barrier()
        resumed = SelectiveSampleBuffer(capacity=16, seed=3)
        resumed.load_state_dict(torch.load(Path(out_dir) / "ssb.pt", weights_only=True))
        got = resumed.on_advantages(trainer_at(1), None, make_rollouts(ZERO * 2, tag=9))
        torch.save({"expected": uids(expected), "got": uids(got), "parts": len(state["per_rank"])},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_each_rank_resumes_its_own_buffer(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["parts"] == r1["parts"] == 2
    # rank r buffered rows 100(r+1) .. 100(r+1)+3; after resuming it replays its own rows, drawn as
    # the uninterrupted rank would have drawn them (same generator state)
    assert r0["got"] == r0["expected"] and r1["got"] == r1["expected"]
    assert set(r0["got"]) <= {100, 101, 102, 103}  # 8 zero rows refilled (with replacement) from rank 0's rows
    assert set(r1["got"]) <= {200, 201, 202, 203}  # ... and rank 1's from its own


def test_a_rank_without_a_saved_part_starts_empty(monkeypatch, caplog):
    import lightning_r1v2.callbacks.buffer as buffer

    ssb = SelectiveSampleBuffer(capacity=16, seed=3)
    ssb.on_advantages(trainer_at(0), None, make_rollouts(EFF + ZERO, tag=1))
    state = ssb.state_dict()  # one rank
    monkeypatch.setattr(buffer, "world_and_rank", lambda: (2, 1))  # resumed on 2 ranks: this is rank 1
    resumed = SelectiveSampleBuffer(capacity=16, seed=3)
    resumed.load_state_dict(state)
    assert len(resumed) == 0 and "starting it from an empty buffer" in caplog.text
