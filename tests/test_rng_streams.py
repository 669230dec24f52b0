"""A checkpoint carries every RNG stream a resumed run draws from, restored bit for bit.

The modules save Python's, NumPy's and torch's global generators with each checkpoint
(``on_save_checkpoint``) and restore them when training restarts (``on_load_checkpoint`` then
``on_train_start``); each stream is checked on its own, so dropping one is caught (issue 22:
Python's RNG not restored on resume passed the whole suite). The buffer's generator and every
rank's streams are checked in ``test_buffer.py`` and ``test_rng_distributed.py``; the two-rank and
whole-run resumes in ``test_resume.py``.
"""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from lightning_r1v2.modules import SFTModule
from lightning_r1v2.utils.checkpoint import reopen_finished_epoch


def draws() -> dict:
    return {"python": [random.random() for _ in range(4)], "numpy": np.random.rand(4).tolist(),
            "torch": torch.rand(4).tolist()}


@pytest.fixture(scope="module")
def module():
    return SFTModule()


def _round_trip(ckpt: dict) -> dict:
    blob = io.BytesIO()
    torch.save(ckpt, blob)
    blob.seek(0)
    return torch.load(blob, weights_only=True)  # what Lightning uses by default


@pytest.mark.parametrize("stream", ["python", "numpy", "torch"])
def test_resume_restores_each_stream_bit_for_bit(module, stream):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    expected = draws()
    # the run dies; the new process has other streams (here: only ``stream`` is moved, so each is checked alone)
    {"python": lambda: random.seed(99), "numpy": lambda: np.random.seed(99), "torch": lambda: torch.manual_seed(99)}[stream]()
    module.on_load_checkpoint(_round_trip(ckpt))
    assert draws()[stream] != expected[stream]  # nothing restored before training starts (after Lightning's seeding)
    module.on_train_start()
    assert draws() == expected


def test_a_checkpoint_without_rng_state_warns_and_changes_nothing(module, caplog):
    torch.manual_seed(3)
    state = torch.get_rng_state()
    module.on_load_checkpoint({})
    module.on_train_start()
    assert torch.equal(torch.get_rng_state(), state)
    assert "no RNG state" in caplog.text


DM = "R1V2DataModule"


def _ckpt(is_last_batch, sampler):
    return {"loops": {"fit_loop": {"epoch_loop.batch_progress": {"is_last_batch": is_last_batch}}},
            DM: {"sampler": sampler} if sampler is not None else {}}


@pytest.mark.parametrize("is_last_batch, sampler, changed", [
    (True, {"epoch": 0, "consumed": 16}, True),   # saved on the epoch's last batch, resumable sampler: reopen
    (False, {"epoch": 0, "consumed": 8}, False),  # mid-epoch: nothing to do
    (True, None, False),                          # a plain loader would replay the epoch: leave it
])
def test_reopen_finished_epoch(is_last_batch, sampler, changed):
    ckpt = _ckpt(is_last_batch, sampler)
    assert reopen_finished_epoch(ckpt, DM) is changed
    flag = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"]
    assert flag is (is_last_batch and not changed)


def test_reopen_finished_epoch_reaches_the_checkpoint_through_the_module(module):
    """``on_load_checkpoint`` applies it with the trainer's DataModule class name as the key."""
    from types import SimpleNamespace

    datamodule = type(DM, (), {})()  # the key is the class's qualified name
    ckpt = _ckpt(True, {"epoch": 0, "consumed": 16})
    module._trainer = SimpleNamespace(datamodule=datamodule)
    try:
        module.on_load_checkpoint(ckpt)
    finally:
        module._trainer = None
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"] is False
