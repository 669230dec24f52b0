"""Stage 2: MPO, Mixed Preference Optimization (InternVL, arXiv 2411.10442; R1V2, arXiv 2504.16656).

L = w_p * L_pref (DPO sigmoid) + w_q * L_qual (BCO pair, running shift delta) + w_g * L_gen
(SFT on the chosen answer); the maths is ``losses.mpo_loss``. Pairs come from ``cli.py
build-pairs`` (``data.pairs.PreferenceDataModule``).

Departures from the papers, and why:
- delta is read BEFORE the step's update (``losses.mpo`` convention), so it never depends on
  the batch it scores; TRL's ``bco_pair`` updates first. Under DDP the rewards are all-gathered
  first, so every rank holds the same delta. It is saved in checkpoints.
- ``reference="precomputed"`` scores every pair under the initial policy once, before the first
  step, and keeps no reference model (half the weights in memory); the result equals
  ``reference="model"`` up to float noise from batching, and is saved in checkpoints.
- Log-probs are of the plain softmax at temperature 1 (no sampling-time token blocking): the
  DPO/BCO log-ratios compare the same distribution under both policies.
"""
from __future__ import annotations

import logging
import math

import torch

from ..losses import RunningMean, mpo_loss, mpo_rewards, shift_for_causal_lm, token_logprobs
from ..models.inputs import policy_io
from ..utils.distributed import all_ranks, world_and_rank
from .common import PolicyModule

log = logging.getLogger("lightning_r1v2.modules")

REFERENCES = ("model", "precomputed")


class MPOModule(PolicyModule):
    """MPO on preference pairs; chosen and rejected rows share one forward pass.

    Args:
        beta: DPO/BCO temperature (InternVL: 0.1).
        weights: ``(w_pref, w_qual, w_gen)`` (InternVL: 0.8, 0.2, 1.0).
        delta_momentum: BCO shift: None = mean of every reward seen (InternVL / old TRL);
            m in [0, 1) = EMA of batch means (NeMo-RL uses 0.99).
        reference: ``model`` keeps a frozen copy of the initial policy (saved in checkpoints);
            ``precomputed`` scores all training pairs once in ``on_fit_start`` (or takes
            ``ref_chosen_logp`` / ``ref_rejected_logp`` from the pairs file when every pair
            has them and their ``ref_policy``, if given, is ``init_ckpt``) and keeps no
            reference model.
        ref_batch_size: Pairs per forward pass when precomputing reference log-probs.
        **kwargs: ``PolicyModule`` arguments (model, trainable, lr, init_ckpt, ...).
    """

    def __init__(
        self,
        beta: float = 0.1,
        weights: tuple[float, float, float] = (0.8, 0.2, 1.0),
        delta_momentum: float | None = None,
        reference: str = "model",
        ref_batch_size: int = 32,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if len(weights) != 3:
            raise ValueError(f"weights must be (w_pref, w_qual, w_gen), got {weights}")
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        self.delta = RunningMean(delta_momentum)
        self.ref_model = None
        if reference == "model" and self.model is not None:  # a deferred policy gets it in configure_model
            self.ref_model = self.frozen_policy_copy()
        self.ref_logps: dict[str, tuple[float, float]] = {}  # pair_id -> (chosen, rejected), "precomputed"
        self._resumed = False

    def configure_model(self):
        """Build the policy (``PolicyModule.configure_model``), then the reference model if ``reference="model"``."""
        super().configure_model()
        if self.hparams.reference == "model" and self.ref_model is None:
            self.ref_model = self.frozen_policy_copy()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()  # the reference never trains, nor drops out
        return self

    # --------------------------------------------------------------- log-probs
    def response_logprobs(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``response_logprobs(model, batch)`` (module level), a method so tests can wrap it."""
        return response_logprobs(model, batch, self.processor)

    def reference_logprobs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs ``[B]`` of the chosen and rejected responses of ``batch``."""
        B = len(batch["pair_ids"])
        if self.ref_model is not None:
            with torch.no_grad():
                ref, _ = self.response_logprobs(self.ref_model, batch)  # [2B]
            return ref[:B], ref[B:]
        missing = [i for i in batch["pair_ids"] if i not in self.ref_logps]
        if missing:
            raise KeyError(f"no precomputed reference log-probs for pair {missing[0]!r} ({len(missing)} missing)")
        ref = torch.tensor([self.ref_logps[i] for i in batch["pair_ids"]], dtype=torch.float32, device=self.device)
        return ref[:, 0], ref[:, 1]  # [B], [B]

    @torch.no_grad()
    def precompute_reference(self, pairs: list[dict], collate) -> int:
        """Score ``pairs`` under the current policy (eval mode) into ``ref_logps``; returns how many were new.

        Under several processes each rank scores a 1/world shard (every rank runs the same number
        of forward passes, as ZeRO-3 needs) and the shards are all-gathered, so every rank ends
        with the whole table. ``pairs`` must be the same list, in the same order, on every rank.
        """
        todo = [p for p in pairs if p["pair_id"] not in self.ref_logps]
        if not todo:
            return 0
        trainer = getattr(self, "_trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        shard = todo[rank::world]
        bs = self.hparams.ref_batch_size
        n_batches = math.ceil(math.ceil(len(todo) / world) / bs)  # the same on every rank
        was_training = self.model.training
        self.model.eval()
        local: dict[str, tuple[float, float]] = {}
        for k in range(n_batches):
            chunk = shard[k * bs : (k + 1) * bs]
            batch = self.transfer_batch_to_device(collate(chunk or todo[:1]), self.device, 0)  # todo[:1]: lockstep filler
            logp, _ = self.response_logprobs(self.model, batch)  # [2B]
            B = len(chunk)
            for i, pid in enumerate(batch["pair_ids"][:B]):
                local[pid] = (float(logp[i]), float(logp[len(batch["pair_ids"]) + i]))
        self.model.train(was_training)
        if world > 1:
            for part in all_ranks(local):
                local.update(part)
        self.ref_logps.update(local)
        return len(todo)

    def on_fit_start(self):
        super().on_fit_start()
        if self.hparams.reference != "precomputed":
            return
        dm = self.trainer.datamodule
        pairs = getattr(dm, "train_records", None)
        if not pairs:
            raise ValueError("reference='precomputed' needs a PreferenceDataModule with training pairs")
        stored = all(p.get(k) is not None for p in pairs for k in ("ref_chosen_logp", "ref_rejected_logp"))
        policies = {p.get("ref_policy") for p in pairs} - {None}
        if stored and policies and policies != {self.hparams.init_ckpt}:
            log.warning("pairs file: reference log-probs were scored by %s, not by init_ckpt %s: scoring again",
                        sorted(policies), self.hparams.init_ckpt)
            stored = False
        if stored:
            for p in pairs:
                self.ref_logps.setdefault(p["pair_id"], (float(p["ref_chosen_logp"]), float(p["ref_rejected_logp"])))
            msg = f"MPO reference: {len(pairs)} pairs' log-probs read from the pairs file"
        else:
            from ..data.pairs import PairCollator

            missing = sum(p["pair_id"] not in self.ref_logps for p in pairs)
            if missing and self._resumed:
                raise ValueError(
                    f"resumed MPO run: {missing} training pairs have no stored reference log-probs, and the "
                    "policy has already trained; resume with the same pairs file"
                )
            n = self.precompute_reference(pairs, PairCollator(self.processor))
            msg = f"MPO reference: scored {n} pairs under the initial policy ({len(self.ref_logps)} stored)"
        log.info(msg)
        if self.trainer.is_global_zero:
            print(msg, flush=True)

    # ------------------------------------------------------------------- step
    def training_step(self, batch, batch_idx):
        hp = self.hparams
        B = len(batch["pair_ids"])
        logp, n_tok = self.response_logprobs(self.model, batch)  # [2B], [2B]
        chosen, rejected = logp[:B], logp[B:]  # [B], [B]
        chosen_nll = -chosen / n_tok[:B].clamp(min=1)  # [B] mean token NLL of the chosen response
        ref_chosen, ref_rejected = self.reference_logprobs(batch)  # [B], [B]
        delta = self.delta.value  # read before this step's update (losses.mpo convention)
        loss, stats = mpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, chosen_nll,
            beta=hp.beta, delta=delta, weights=tuple(hp.weights),
        )
        r_c, r_r = mpo_rewards(chosen.detach(), rejected.detach(), ref_chosen, ref_rejected, hp.beta)
        self.delta.update(self._gather(torch.cat([r_c, r_r])))
        stats["delta_next"] = torch.tensor(self.delta.value, device=self.device)
        stats["tokens/chosen"] = n_tok[:B].float().mean()
        stats["tokens/rejected"] = n_tok[B:].float().mean()
        self.log_dict({f"train/{k}": v.float() for k, v in stats.items() if k != "loss"}, batch_size=B)
        self.log("train/loss", stats["loss"], prog_bar=True, batch_size=B)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=B)
        self.log("train/tokens_per_s", self._throughput(int(batch["attention_mask"].sum())), batch_size=B)
        return loss

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        if world_and_rank()[0] > 1:
            return self.all_gather(x).flatten()
        return x

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["mpo_delta"] = self.delta.state_dict()
        if self.ref_logps:
            checkpoint["mpo_ref_logps"] = dict(self.ref_logps)

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)  # the RNG state (PolicyModule)
        if "mpo_delta" in checkpoint:
            self.delta.load_state_dict(checkpoint["mpo_delta"])
        self.ref_logps = {k: tuple(v) for k, v in checkpoint.get("mpo_ref_logps", {}).items()}
        self._resumed = True


def response_logprobs(model, batch: dict, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-prob of the response summed over its tokens ``[N]``, and its token count ``[N]``.

    Rows are ``PairCollator`` rows (right padded, ``labels`` -100 outside the response). The
    ``build-pairs`` job uses it to store reference log-probs in the pairs file.
    """
    io = policy_io(processor)
    out = model(**io.model_inputs(batch["input_ids"], batch["attention_mask"], batch["media"],
                                  batch.get("token_inputs"), dtype=model.dtype))
    logits, labels = shift_for_causal_lm(out.logits, batch["labels"])  # [N, T-1, V], [N, T-1]
    mask = (labels != -100).float()  # [N, T-1]
    logp = token_logprobs(logits, labels) * mask  # [N, T-1]
    return logp.sum(-1), mask.sum(-1)  # [N], [N]
