"""What the SFT, MPO and GRPO modules share: the policy, optimiser, schedule and evaluation."""
from __future__ import annotations

import logging
import math
import time

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric

from ..models.loading import load_policy, set_trainable
from ..utils.checkpoint import reopen_finished_epoch, rng_state, set_rng_state

log = logging.getLogger("lightning_r1v2.modules")


class PolicyModule(L.LightningModule):
    """Base of the three stages.

    Args:
        model: ``"tiny"`` for the embedded default, or a local checkpoint folder.
        trainable: Parts that train: any of ``vision``, ``connector``, ``llm``.
        lr: Peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_ratio: Share of the run spent in linear warmup (then cosine to ``min_lr_ratio * lr``).
        min_lr_ratio: Floor of the cosine schedule, as a share of ``lr``.
        dtype: Weights' dtype (``bfloat16`` at scale; None keeps the checkpoint's).
        seed: Init seed of the embedded default.
        eval_max_new_tokens: Generation length for held-out evaluation.
        eval_batch_size: Not used for batching (the DataModule batches); kept for documentation.
        gradient_checkpointing: Recompute activations in the backward pass (memory for time).
        init_ckpt: Start from the policy weights of this Lightning checkpoint (an earlier stage's).
    """

    def __init__(
        self,
        model: str = "tiny",
        trainable: list[str] = ("vision", "connector", "llm"),
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.05,
        min_lr_ratio: float = 0.0,
        dtype: str | None = None,
        seed: int = 0,
        eval_max_new_tokens: int = 32,
        gradient_checkpointing: bool = False,
        init_ckpt: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model_name = model
        self.trainable = list(trainable)
        self.model = None
        self.processor = None
        self.param_counts: dict[str, int] = {}
        self._build()
        self.val_accuracy = MeanMetric()
        self.val_format = MeanMetric()
        self._t_last = None

    # ----------------------------------------------------------------- model
    def _build(self):
        model, processor = load_policy(self.model_name, dtype=self.hparams.dtype, seed=self.hparams.seed)
        if self.hparams.init_ckpt:
            load_policy_weights(model, self.hparams.init_ckpt)
        self.param_counts = set_trainable(model, self.trainable)
        if self.hparams.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.model, self.processor = model, processor

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def on_fit_start(self):
        c = self.param_counts
        msg = f"trainable parts {self.trainable}: {c['trainable']:,} trainable, {c['frozen']:,} frozen parameters"
        log.info(msg)
        if self.trainer.is_global_zero:
            print(msg, flush=True)
        for logger in self.loggers:
            logger.log_hyperparams({f"params/{k}": c[k] for k in ("trainable", "frozen")})

    # ----------------------------------------------------------- checkpoints
    # Lightning restores weights, optimizer, schedulers, loop progress, callback and datamodule
    # state on ``--ckpt_path``, but not the global RNGs: they travel here. A subclass that
    # overrides ``on_load_checkpoint`` must call ``super().on_load_checkpoint(checkpoint)``.
    def on_save_checkpoint(self, checkpoint):
        cls = type(self)
        checkpoint["r1v2_module_class"] = f"{cls.__module__}.{cls.__qualname__}"
        checkpoint["r1v2_rng_state"] = rng_state()

    def on_load_checkpoint(self, checkpoint):
        # restored in on_train_start: after Lightning's seeding, set-up and first ``iter(loader)``
        self._pending_rng_state = checkpoint.get("r1v2_rng_state")
        if self._pending_rng_state is None:
            log.warning("the checkpoint holds no RNG state: a resumed run samples differently from an uninterrupted one")
        dm = self._trainer.datamodule if self._trainer is not None else None
        if dm is not None:  # runs before Lightning reads the loop state from ``checkpoint``
            reopen_finished_epoch(checkpoint, type(dm).__qualname__)

    def on_train_start(self):
        state = getattr(self, "_pending_rng_state", None)
        if state is not None:
            set_rng_state(state)
            self._pending_rng_state = None

    # ------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
        )
        total = max(1, self._total_steps())
        warmup = int(self.hparams.warmup_ratio * total)
        floor = self.hparams.min_lr_ratio
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total, floor))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _total_steps(self) -> int:
        return int(self.trainer.estimated_stepping_batches)

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int, do_sample: bool = False, **kw) -> list[str]:
        """Batched generation from a ``PromptCollator`` batch; returns decoded completions."""
        out = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"].to(self.model.dtype),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **kw,
        )
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=False)

    def validation_step(self, batch, batch_idx):
        from ..rewards import accuracy_reward, format_reward

        texts = [clean_completion(t, self.tokenizer) for t in self.generate(batch, self.hparams.eval_max_new_tokens)]
        recs = batch["records"]
        acc = accuracy_reward(texts, answer=[r["answer"] for r in recs], choices=[r.get("choices") for r in recs])
        fmt = format_reward(texts)
        self.val_accuracy.update(torch.tensor([float(a or 0.0) for a in acc]))
        self.val_format.update(torch.tensor([float(f or 0.0) for f in fmt]))
        self.log("val/accuracy", self.val_accuracy, on_epoch=True, prog_bar=True, batch_size=len(recs))
        self.log("val/format", self.val_format, on_epoch=True, prog_bar=True, batch_size=len(recs))

    # --------------------------------------------------------------- timing
    def _throughput(self, tokens: int) -> float:
        now = time.perf_counter()
        rate = 0.0 if self._t_last is None else tokens / max(now - self._t_last, 1e-9)
        self._t_last = now
        return rate


def load_policy_weights(model, ckpt_path: str) -> None:
    """Copy the ``model.*`` weights of a lightning-r1v2 checkpoint into ``model`` (strict)."""
    from pathlib import Path

    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"init_ckpt {ckpt_path!r} does not exist (run the previous stage first)")
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in ("lm_head.weight",)]  # tied to the embeddings
    if missing or unexpected:
        raise ValueError(f"{ckpt_path}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    log.info("loaded policy weights from %s", ckpt_path)


def clean_completion(text: str, tokenizer) -> str:
    """Cut a decoded completion at the end-of-turn token and drop padding."""
    eos = tokenizer.eos_token
    if eos and eos in text:
        text = text[: text.index(eos)]
    return text.replace(tokenizer.pad_token or "", "")


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine from 1 to ``floor`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
