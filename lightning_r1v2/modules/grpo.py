"""Stage 3: GRPO over rollouts of the VLM (R1V2, arXiv 2504.16656; R1V3, arXiv 2507.06167).

One training step = one batch of prompts:
  rollouts (engine) -> reward columns (RewardCallbacks, config order) -> monitors (on_rewards)
  -> combined reward -> group advantages -> buffer (on_advantages) -> optimizer steps over
  mini-batches (manual optimization) -> metrics.

Departures from the papers, and why:
- Behaviour log-probs come from the sampling pass itself (the engine records them), so no
  extra forward runs before the first update; with one update per batch the ratio is 1 up to
  numerics, as in on-policy GRPO.
- Rows whose reward faulted with ``on_error="drop_group"`` are masked out of the loss.
- A reference model exists only when ``kl_coef > 0`` (R1V3 uses no KL).
- Options beside the paper (all off by default): GSPO's sequence ratio (``importance_level``),
  Dr. GRPO's constant-length divisor (``aggregation: token_sum_norm``), high-entropy tokens only
  (``entropy_quantile``), rollout correction for the engine's log-probs (``rollout_correction``);
  DAPO's dynamic sampling is the ``DynamicSampling`` callback (it calls ``score_rollouts``).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

import torch

from ..callbacks.hooks import call_rollout_hook, reward_callbacks, step_stats
from ..losses import entropy_from_logits, group_advantages, grpo_loss, masked_mean, micro_batch_weights, token_logprobs
from ..losses import high_entropy_mask, rollout_correction_weights
from ..losses.correction import MODES as ROLLOUT_CORRECTION_MODES
from ..losses.grpo import AGGREGATIONS, IMPORTANCE_LEVELS
from ..rewards.combine import combine_columns, score_columns
from ..rollout.base import RolloutEngine
from ..rollout.hf_engine import HFGenerateEngine
from ..rollout.scoring import completion_logits
from ..rollout.types import Rollouts
from ..utils.distributed import deepspeed_config
from .common import PolicyModule

log = logging.getLogger("lightning_r1v2.modules")


class GRPOModule(PolicyModule):
    """GRPO with group-normalised advantages and the clipped surrogate.

    Args:
        engine: Rollout engine (``HFGenerateEngine`` by default; the vLLM engine by class_path).
        group_size: Completions sampled per prompt (G; R1V1 8, R1V3 32).
        clip_eps: PPO clip (0.2 in R1V3).
        clip_eps_high: Upper clip (DAPO's clip-higher); None = ``clip_eps``.
        kl_coef: Coefficient of the k3 KL to a frozen reference (0 in R1V3: no reference kept).
        aggregation: ``sequence`` (mean per sequence, then over sequences: the paper), ``token``
            (DAPO's token mean) or ``token_sum_norm`` (Dr. GRPO: each sequence's token sum divided by
            the engine's ``max_new_tokens``, then the mean over sequences).
        importance_level: ``token`` (the PPO ratio per token) or ``sequence`` (GSPO, arXiv
            2507.18071: one ratio per sequence, the geometric mean of its token ratios, clipped per
            sequence; the paper clips with eps 3e-4 / 4e-4).
        entropy_quantile: Share of each loss call's response tokens, highest entropy first, that
            carry the policy gradient (1.0: all; 0.2: the top 20%, arXiv 2506.01939).
        rollout_correction: Correct for the rollout engine's log-probs differing from the trainer's
            (None: off): ``token_truncate``, ``token_mask``, ``sequence_truncate`` or
            ``sequence_mask``. The trainer's log-probs of the batch are computed before the update
            (one extra no-grad forward) and are the PPO ratio's denominator; the engine's recorded
            ones give the weight w = pi_trainer / pi_engine, truncated at (or masked above)
            ``rollout_correction_cap`` (``losses/correction.py``). Rows replayed by the sample buffer
            keep the log-probs of the step that sampled them, so their weight also holds their
            staleness (truncated alike). TRL turns it on by default
            (``sequence_mask``, cap 3); verl has it off by default (``rollout_is``, threshold 2).
        rollout_correction_cap: The cap C of the weight.
        rollout_correction_cap_low: Mask modes: also drop weights below this (None: no lower edge).
        scale_advantages: Divide by the group std (False: Dr. GRPO style ``r - mean``).
        reward_mode: ``sum`` (R1V2), ``weighted`` (R1V3 0.8 acc + 0.2 format) or ``gate``.
        mini_batch_size: Rollout rows per optimizer step (0: the whole batch, one step).
        micro_batch_size: Rows per forward/backward inside an optimizer step (0: the whole
            mini-batch at once). Gradients of the micro-batches are accumulated with weights that
            make the step's gradient equal the whole mini-batch's (``micro_batch_weights``).
            Under DeepSpeed set ``managed_gradient_accumulation: false`` in its config, so that
            backward only accumulates and ``opt.step()`` is the boundary.
        updates_per_batch: Passes over the rollout batch (1: on-policy, as R1V3). Note that
            ``trainer.max_steps`` counts optimizer steps: passes x mini-batches per rollout batch.
        max_grad_norm: Gradient clipping (0: off). Under DeepSpeed set it in the strategy config.
        table_every_n_steps: Write a table of sample completions every N steps (0: never).
        table_rows: Rows of that table.
        share_prompt_forward: In the update, run each group's prompt and image once and reuse
            its KV cache (in the autograd graph) for the group's completions; same loss and
            gradients up to float rounding, ``(G - 1) / G`` less prompt and vision work.
        init_ckpt: Start from this checkpoint's policy weights (e.g. the SFT stage's ``last.ckpt``).
        **kwargs: ``PolicyModule`` arguments (model, trainable, lr, ...).
    """

    def __init__(
        self,
        engine: RolloutEngine | None = None,
        group_size: int = 8,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        kl_coef: float = 0.0,
        aggregation: str = "sequence",
        importance_level: str = "token",
        entropy_quantile: float = 1.0,
        rollout_correction: str | None = None,
        rollout_correction_cap: float = 2.0,
        rollout_correction_cap_low: float | None = None,
        scale_advantages: bool = True,
        reward_mode: str = "weighted",
        mini_batch_size: int = 0,
        micro_batch_size: int = 0,
        updates_per_batch: int = 1,
        max_grad_norm: float = 1.0,
        table_every_n_steps: int = 50,
        table_rows: int = 8,
        share_prompt_forward: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["engine"])
        if mini_batch_size < 0 or micro_batch_size < 0:
            raise ValueError(f"mini_batch_size and micro_batch_size must be >= 0 (0: all), got {mini_batch_size}, {micro_batch_size}")
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 for group advantages, got {group_size}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if importance_level not in IMPORTANCE_LEVELS:
            raise ValueError(f"importance_level must be one of {IMPORTANCE_LEVELS}, got {importance_level!r}")
        if not 0 < entropy_quantile <= 1:
            raise ValueError(f"entropy_quantile must be in (0, 1] (1.0: every token), got {entropy_quantile}")
        if rollout_correction is not None and rollout_correction not in ROLLOUT_CORRECTION_MODES:
            raise ValueError(f"rollout_correction must be None or one of {ROLLOUT_CORRECTION_MODES}, got {rollout_correction!r}")
        self.engine = engine or HFGenerateEngine()
        self.automatic_optimization = False
        self.ref_model = None
        if kl_coef > 0 and self.model is not None:  # a deferred policy gets its reference in configure_model
            self.ref_model = self.frozen_policy_copy()
        self.last_rollouts: Rollouts | None = None
        self.phase_times: dict[str, float] = {}

    def configure_model(self):
        """Build the policy (``PolicyModule.configure_model``), then the reference if ``kl_coef > 0`` (idempotent)."""
        super().configure_model()
        if self.hparams.kl_coef > 0 and self.ref_model is None:
            self.ref_model = self.frozen_policy_copy()

    # ---------------------------------------------------------------- helpers
    def reward_callbacks(self) -> list:
        cbs = reward_callbacks(self.trainer)
        if not cbs:
            raise ValueError(
                "GRPO needs at least one RewardCallback in trainer.callbacks, e.g.\n"
                "  - class_path: lightning_r1v2.rewards.RewardCallback\n"
                "    init_args: {fn: lightning_r1v2.rewards.accuracy_reward, weight: 0.8}"
            )
        return cbs

    def sequence_logprobs(self, model, rows: Rollouts, with_entropy: bool = False):
        """Per-token log-probs ``[n, C]`` of the completions under ``model`` (and entropies)."""
        logits = completion_logits(model, rows, self.engine.temperature, self.processor,
                                   share_prompt=self.hparams.share_prompt_forward)
        logp = token_logprobs(logits, rows.completion_ids)  # [n, C]
        logp = logp.masked_fill(rows.completion_mask == 0, 0.0)  # padding is a blocked token (-inf)
        ent = entropy_from_logits(logits.detach()) if with_entropy else None  # [n, C]
        return logp, ent

    def optimizer_steps_per_batch(self, prompts: int) -> int:
        """Optimizer steps ``_update`` takes on a rollout batch of ``prompts`` prompts (per device):
        passes x mini-batches. ``trainer.max_steps`` and ``trainer.global_step`` count these."""
        rows = prompts * self.hparams.group_size
        return self.hparams.updates_per_batch * math.ceil(rows / (self.hparams.mini_batch_size or rows))

    def _total_steps(self) -> int:
        """Optimizer steps of the run, for the LR schedule: ``max_steps`` when set, else Lightning's
        batch estimate (``max_epochs``) times the optimizer steps of each rollout batch."""
        trainer = self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        prompts = getattr(trainer.datamodule, "hparams", {}).get("batch_size") if trainer.datamodule else None
        per_batch = self.optimizer_steps_per_batch(prompts) if prompts else 1
        return int(trainer.estimated_stepping_batches) * per_batch

    def configure_callbacks(self):
        """The step's bookkeeping, kept out of the algorithm: the progress bar counted in rollout
        batches, and the table of sample completions."""
        from ..callbacks.completions import CompletionsTable
        from ..callbacks.progress import RolloutBatchProgress

        return [RolloutBatchProgress(), CompletionsTable(self.hparams.table_every_n_steps, self.hparams.table_rows)]

    # ------------------------------------------------------------------ step
    def training_step(self, batch, batch_idx):
        hp = self.hparams
        t0 = time.perf_counter()
        rollouts = self.engine.generate(self.policy(), batch, hp.group_size)
        t1 = time.perf_counter()
        call_rollout_hook(self.trainer, self, "on_rollouts", rollouts)
        rollouts = self.score_rollouts(rollouts)
        pre = self._reward_stats(rollouts)
        t2 = time.perf_counter()
        self.add_reference_logprobs(rollouts)
        rollouts = call_rollout_hook(self.trainer, self, "on_advantages", rollouts).to(self.device)
        stats = self._update(rollouts)
        t3 = time.perf_counter()
        self.phase_times = {"time/generate": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2}
        n_tokens = int(rollouts.completion_mask.sum())
        stats.update(pre)
        stats.update(self.phase_times)
        stats["rollout_tokens_per_s"] = n_tokens / max(t1 - t0, 1e-9)
        stats.update(step_stats(self.trainer))
        reward = float(stats.pop("reward"))
        if self._logging_step():  # ~40 metrics: Lightning's per-key bookkeeping is not free at small steps
            self.log_dict({k: float(v) for k, v in stats.items()}, prog_bar=False, batch_size=len(rollouts))
        self.log("reward", reward, prog_bar=True, batch_size=len(rollouts))
        self.last_rollouts = rollouts  # read by CompletionsTable (and tests) after the step

    def score_rollouts(self, rollouts: Rollouts, hooks: bool = True) -> Rollouts:
        """Reward columns (``RewardCallback``s, config order), ``on_rewards``, the combined reward and
        the group advantages of ``rollouts``; returns the scored batch, on the module's device.
        ``hooks=False`` skips ``on_rewards``: the extra rollouts of ``DynamicSampling`` are scored
        without the monitors counting them."""
        hp = self.hparams
        cbs = self.reward_callbacks()
        score_columns(rollouts, cbs)
        if hooks:
            call_rollout_hook(self.trainer, self, "on_rewards", rollouts)
        rollouts = rollouts.to(self.device)  # reward columns and fault masks may come back on the CPU
        rollouts.reward = combine_columns(rollouts, cbs, hp.reward_mode)
        rollouts.advantages = group_advantages(rollouts.reward, hp.group_size, scale=hp.scale_advantages)
        return rollouts

    def add_reference_logprobs(self, rollouts: Rollouts) -> None:
        """The reference model's log-probs of ``rollouts`` (``ref_logprobs``), where there is a reference
        (``kl_coef > 0``) and the batch has none yet (rows replayed by the buffer keep theirs)."""
        if self.ref_model is not None and rollouts.ref_logprobs is None:
            with torch.no_grad():
                rollouts.ref_logprobs = self.sequence_logprobs(self.ref_model, rollouts)[0]

    def _logging_step(self) -> bool:
        """Whether this step's metrics are logged: every ``trainer.log_every_n_steps`` rollout
        batches (and on the last), as Lightning's loggers write them. ``reward`` is logged every
        step; callbacks that read ``trainer.callback_metrics`` see the rest on logging steps."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return True if connector is None else bool(connector.should_update_logs)

    def _reward_stats(self, r: Rollouts) -> dict:
        G = self.hparams.group_size
        grouped = r.reward.view(-1, G)  # [B, G]
        lengths = r.completion_mask.sum(1).float()  # [N]
        return {
            "reward": r.reward.mean(),
            "reward_std": r.reward.std() if len(r) > 1 else torch.tensor(0.0, device=r.reward.device),
            "frac_reward_zero_std": (grouped.std(dim=1) < 1e-6).float().mean(),
            "effective_share": (r.advantages.abs() > 1e-6).float().mean(),
            "completions/mean_length": lengths.mean(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": r.truncated.float().mean() if r.truncated is not None else torch.tensor(0.0, device=r.reward.device),
        }

    def _update(self, rollouts: Rollouts) -> dict:
        hp = self.hparams
        opt = self.optimizers()
        sched = self.lr_schedulers()
        n = len(rollouts)
        mb = hp.mini_batch_size or n
        micro = min(hp.micro_batch_size or mb, mb)
        mask_all = rollouts.completion_mask.float()
        if rollouts.dropped is not None:
            mask_all = mask_all * (~rollouts.dropped).float()[:, None]
        totals: dict[str, float] = {}
        count = 0
        single_pass = hp.updates_per_batch == 1 and mb >= n
        weights_all, batch_stats = None, {}
        crit_sum, crit_n = 0.0, 0  # R1V3's critical-token entropy, on this step's own tokens (first pass)
        critical = self._critical_ids(rollouts.completion_ids.device)
        if hp.rollout_correction is not None:  # the engine's log-probs weigh the loss; the trainer's are pi_old
            if rollouts.old_logprobs is None:
                raise ValueError(f"rollout_correction={hp.rollout_correction!r} needs the log-probs the engine recorded "
                                 f"while sampling, and {type(self.engine).__name__} recorded none (record_logprobs?)")
            trainer_old = self._policy_logprobs(rollouts, micro)  # [N, C]
            weights_all, batch_stats = rollout_correction_weights(
                trainer_old, rollouts.old_logprobs, mask_all, hp.rollout_correction,
                hp.rollout_correction_cap, hp.rollout_correction_cap_low)  # [N, C]
            rollouts = replace(rollouts, old_logprobs=trainer_old)
        elif rollouts.old_logprobs is None and not single_pass:
            rollouts.old_logprobs = self._policy_logprobs(rollouts, micro)
        for pass_i in range(hp.updates_per_batch):
            for start in range(0, n, mb):
                rows_of_step = list(range(start, min(start + mb, n)))
                chunks = [rows_of_step[i:i + micro] for i in range(0, len(rows_of_step), micro)]
                weights = micro_batch_weights(mask_all[rows_of_step], [len(c) for c in chunks], hp.aggregation)
                if len(chunks) > 1:
                    self._check_accumulation()
                opt.zero_grad()
                step_stats: dict[str, float] = {}
                for idx, w in zip(chunks, weights):  # gradient accumulation: sum_k w_k grad L_k = grad L
                    rows = rollouts.select(idx)
                    mask = mask_all[idx]
                    logp, ent = self.sequence_logprobs(self.model, rows, with_entropy=True)
                    old = rows.old_logprobs if rows.old_logprobs is not None else logp.detach()
                    token_w = None if weights_all is None else weights_all[idx]  # [n, C]
                    if hp.entropy_quantile < 1.0:
                        keep_ent, tau = high_entropy_mask(ent, mask, hp.entropy_quantile)  # [n, C]
                        token_w = keep_ent if token_w is None else token_w * keep_ent
                    loss, stats = grpo_loss(
                        logp, old, rows.advantages, mask,
                        clip_eps=hp.clip_eps, clip_eps_high=hp.clip_eps_high,
                        ref_logprobs=rows.ref_logprobs, kl_coef=hp.kl_coef, aggregation=hp.aggregation,
                        importance_level=hp.importance_level, token_weights=token_w,
                        length_norm=getattr(self.engine, "max_new_tokens", None),
                    )
                    self.manual_backward(loss * w)  # w = 1 for a single micro-batch (0 if it has no tokens)
                    stats["entropy"] = masked_mean(ent, mask)
                    if pass_i == 0 and critical.numel():
                        at = torch.isin(rows.completion_ids, critical) & (mask > 0)  # [n, C]
                        crit_sum, crit_n = crit_sum + float(ent[at].sum()), crit_n + int(at.sum())
                    if hp.entropy_quantile < 1.0:
                        stats["entropy/quantile_threshold"] = tau if torch.isfinite(tau) else torch.zeros_like(tau)
                    for k, v in stats.items():  # stats weighted like the loss; all 0 where w is 0
                        step_stats[k] = step_stats.get(k, 0.0) + w * float(v)
                if hp.max_grad_norm:
                    self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                if sched is not None:  # one schedule step per optimizer step, as trainer.max_steps counts
                    sched.step()
                for k, v in step_stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                count += 1
        out = {k: v / count for k, v in totals.items()}
        out.update({k: float(v) for k, v in batch_stats.items()})
        out["entropy/critical_step_count"] = float(crit_n)
        if crit_n:  # no critical token sampled: no value (never a made-up 0)
            out["entropy/critical_step_mean"] = crit_sum / crit_n
        return out

    def _critical_ids(self, device) -> torch.Tensor:
        """Ids of R1V3's critical reasoning tokens ("Wait", "But", ..., ``</think>``) for this tokenizer."""
        if getattr(self, "_critical", None) is None:
            from ..callbacks.entropy import CRITICAL_TOKENS, critical_token_ids

            ids, _ = critical_token_ids(self.tokenizer, list(CRITICAL_TOKENS))
            self._critical = torch.tensor(sorted(ids), dtype=torch.long)  # on CPU: moved to the batch's device below
        return self._critical.to(device)

    @torch.no_grad()
    def _policy_logprobs(self, rollouts: Rollouts, micro: int):
        """Log-probs ``[N, C]`` of the batch under the policy as it is now, ``micro`` rows at a time."""
        n = len(rollouts)
        return torch.cat([self.sequence_logprobs(self.model, rollouts.select(range(i, min(i + micro, n))))[0]
                          for i in range(0, n, micro)])

    def _check_accumulation(self):
        cfg = deepspeed_config(self.trainer)
        if cfg is not None and cfg.get("managed_gradient_accumulation", True):
            raise ValueError(
                f"micro_batch_size={self.hparams.micro_batch_size} accumulates gradients over several backward "
                "passes per optimizer step; under DeepSpeed that needs `managed_gradient_accumulation: false` "
                "in the strategy's DeepSpeed config (a key of DeepSpeed 0.19), else each backward is reduced and "
                "stepped as its own boundary. Set it, or set micro_batch_size to 0."
            )
