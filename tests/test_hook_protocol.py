"""A new reward and a new monitor, written against callbacks/hooks.py's documented protocol alone.

A toy length penalty (a reward callback: ``score``, ``name``, ``weight``) and a monitor that halves
its weight whenever mean completion length passes a bound (``on_rewards`` + ``set_reward_weight``),
reporting through ``last_stats``. Nothing here reads the module's internals: the run goes through a
Trainer and the checks read what the protocol promises (logged metrics, the weight, the hooks' order).
"""
import lightning as L
import torch

from lightning_r1v2.callbacks.hooks import RolloutHooks, set_reward_weight


class LengthPenalty(L.Callback):
    name = "length_penalty"

    def __init__(self, weight=1.0):
        self.weight = weight
        self.calls = 0

    def score(self, rollouts):
        self.calls += 1
        lengths = rollouts.completion_mask.sum(1).float()  # [N]
        return -lengths / rollouts.completion_mask.shape[1]


class LengthMonitor(RolloutHooks):
    def __init__(self, bound):
        self.bound = bound
        self.seen = []
        self.last_stats = {}

    def on_rollouts(self, trainer, pl_module, rollouts):
        self.seen.append(("on_rollouts", "length_penalty" in rollouts.rewards))

    def on_rewards(self, trainer, pl_module, rollouts):
        self.seen.append(("on_rewards", "length_penalty" in rollouts.rewards))
        mean_len = float(rollouts.completion_mask.sum(1).float().mean())
        if mean_len > self.bound:
            cb = [c for c in trainer.callbacks if getattr(c, "name", None) == "length_penalty"][0]
            set_reward_weight(trainer, "length_penalty", cb.weight / 2)
        self.last_stats = {"toy/mean_length": mean_len}

    def on_advantages(self, trainer, pl_module, rollouts):
        self.seen.append(("on_advantages", rollouts.advantages is not None))


def test_a_reward_and_a_monitor_written_against_the_protocol(tiny_data, tmp_path):
    from lightning_r1v2.data.datamodule import R1V2DataModule
    from lightning_r1v2.modules.grpo import GRPOModule
    from lightning_r1v2.rollout.hf_engine import HFGenerateEngine

    torch.manual_seed(0)
    reward, monitor = LengthPenalty(weight=1.0), LengthMonitor(bound=0.0)  # every step is over the bound
    module = GRPOModule(group_size=2, engine=HFGenerateEngine(max_new_tokens=5), table_every_n_steps=0)
    dm = R1V2DataModule(train_file=str(tiny_data / "train.jsonl"), val_file=None, kind="prompts", batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        callbacks=[reward, monitor], default_root_dir=tmp_path)
    trainer.fit(module, dm)
    assert reward.calls == 3
    assert reward.weight == 1.0 / 2 ** 3  # halved on each of the 3 steps
    # hooks in the documented order, with the documented state
    assert monitor.seen[:3] == [("on_rollouts", False), ("on_rewards", True), ("on_advantages", True)]
    assert "toy/mean_length" in trainer.callback_metrics  # last_stats reach the logs
    assert float(trainer.callback_metrics["toy/mean_length"]) > 0
