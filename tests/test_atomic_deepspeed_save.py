"""AtomicDeepSpeedStrategy: a DeepSpeed checkpoint folder is swapped in whole, or the old one stays.

Lightning's DeepSpeedStrategy has every rank overwrite its shard files inside the target folder; a
kill during the save leaves a mix of two steps. The engine is a stand-in here (its save writes one
shard file per call, and can fail half-way, as a killed rank would); the real engine runs through
this strategy in tests/test_deepspeed_multirank.py.
"""
import pytest

from lightning_r1v2 import strategies
from lightning_r1v2.strategies import AtomicDeepSpeedStrategy, swap_in


class _Engine:
    """Writes ``<path>/latest`` and ``<path>/checkpoint/shard.pt`` like DeepSpeedEngine.save_checkpoint."""

    def __init__(self):
        self.fail = False

    def save_checkpoint(self, path, client_state, tag, exclude_frozen_parameters=False):
        from pathlib import Path

        (Path(path) / tag).mkdir(parents=True, exist_ok=True)
        (Path(path) / tag / "shard.pt").write_text(f"step {client_state['global_step']}")
        if self.fail:
            raise KeyboardInterrupt("killed half-way")  # the shard is written, 'latest' is not
        (Path(path) / "latest").write_text(tag)


def _strategy():
    s = AtomicDeepSpeedStrategy(config={"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    s.model = _Engine()
    return s


def _save(s, path, step):
    s.save_checkpoint({"global_step": step, "state_dict": {}, "optimizer_states": []}, str(path))


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_whole(tmp_path):
    s, last = _strategy(), tmp_path / "last.ckpt"
    _save(s, last, 10)
    assert (last / "checkpoint" / "shard.pt").read_text() == "step 10" and (last / "latest").exists()
    s.model.fail = True
    with pytest.raises(KeyboardInterrupt):
        _save(s, last, 20)
    assert (last / "checkpoint" / "shard.pt").read_text() == "step 10" and (last / "latest").exists()
    s.model.fail = False
    _save(s, last, 30)  # the next save clears the killed one's staging folder
    assert (last / "checkpoint" / "shard.pt").read_text() == "step 30"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_lightnings_strategy_leaves_a_mix(tmp_path):
    """What the subclass exists for: the parent overwrites in place."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    s, last = DeepSpeedStrategy(config={"train_micro_batch_size_per_gpu": 1}), tmp_path / "last.ckpt"
    s.model = _Engine()
    _save(s, last, 10)
    s.model.fail = True
    with pytest.raises(KeyboardInterrupt):
        _save(s, last, 20)
    assert (last / "checkpoint" / "shard.pt").read_text() == "step 20"  # the new shard beside the old 'latest'


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_swap_in_replaces_a_folder_and_leaves_nothing_behind(tmp_path, monkeypatch, exchange):
    if not exchange:  # file systems without RENAME_EXCHANGE (some network file systems)
        monkeypatch.setattr(strategies, "_rename_exchange", lambda a, b: False)
    target, staging = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.partial"
    assert swap_in(_folder(staging, "one"), target) == "rename"
    how = swap_in(_folder(staging, "two"), target)
    assert how == ("exchange" if exchange else "two renames")
    assert (target / "f").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def _folder(path, text):
    path.mkdir()
    (path / "f").write_text(text)
    return path
