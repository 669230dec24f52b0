"""Each rank's generator states are saved and each rank gets its own back (2 CPU processes, gloo).

Lightning writes rank 0's checkpoint dict (DDP, ZeRO-2); with only a rank-local entry every rank
would resume with rank 0's streams.
"""
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_r1v2.utils.checkpoint import save_rng_states, saved_rng_state, set_rng_state


def _worker(rank: int, world: int, init_file: str, out_dir: str):
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        torch.rand(5 + 7 * rank)  # the ranks consumed their streams differently (generation lengths)
        ckpt = {}
        save_rng_states(ckpt)  # collective
        if rank == 0:
            torch.save(ckpt, Path(out_dir) / "ckpt.pt")  # what Lightning writes
        expected = torch.rand(4)  # what an unbroken run draws next
        dist.barrier()
        torch.manual_seed(123)  # a fresh process, seeded again by seed_everything
        set_rng_state(saved_rng_state(torch.load(Path(out_dir) / "ckpt.pt", weights_only=False)))
        torch.save({"expected": expected, "got": torch.rand(4)}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_each_rank_resumes_its_own_generators(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["got"], r0["expected"]) and torch.equal(r1["got"], r1["expected"])
    assert not torch.equal(r0["expected"], r1["expected"])  # so taking rank 0's state would be caught
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert len(ckpt["r1v2_rng_states"]) == 2 and torch.equal(ckpt["r1v2_rng_state"]["torch"],
                                                              ckpt["r1v2_rng_states"][0]["torch"])


def test_one_rank_checkpoints_keep_the_single_entry():
    torch.manual_seed(1)
    ckpt = {}
    save_rng_states(ckpt)
    assert "r1v2_rng_states" not in ckpt
    expected = torch.rand(3)
    set_rng_state(saved_rng_state(ckpt))
    assert torch.equal(torch.rand(3), expected)
