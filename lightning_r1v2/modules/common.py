"""What the SFT, MPO and GRPO modules share: the policy, optimiser, schedule and evaluation."""
from __future__ import annotations

import copy
import logging
import math
import time

import lightning as L
import torch
from torchmetrics.aggregation import MeanMetric

from ..models.inputs import policy_io
from ..models.weights import hf_deepspeed_config, load_policy_weights
from ..models.loading import (
    is_zero3_partitioned,
    load_policy_model,
    load_policy_processor,
    param_ndim,
    set_trainable,
)
from ..utils.checkpoint import reopen_finished_epoch, save_rng_states, saved_rng_state, set_rng_state
from ..utils.distributed import deepspeed_zero3_config

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
        gradient_checkpointing: Recompute activations in the backward pass (memory for time).
        init_ckpt: Start from the policy weights of this Lightning checkpoint (an earlier stage's; a
            LoRA checkpoint is merged into the weights first).
        lora: LoRA adapters (``models/lora.py``: ``r``, ``alpha``, ``dropout``, ``parts``,
            ``target_modules``); then ``trainable`` lists the parts trained in full besides the
            adapters (``[]``: adapters only). The reference policy is the model with adapters off,
            checkpoints hold the trained tensors only, ``export`` merges or writes a PEFT folder.
        defer_init: Build the policy in ``configure_model`` instead of here. Lightning calls that
            hook at the start of ``fit`` / ``validate`` / ``test`` / ``predict`` (and
            ``load_from_checkpoint`` calls it too); under DeepSpeed ZeRO-3 the weights are then
            partitioned while they load, so no rank ever holds the whole model (see
            ``configure_model``). ``None`` (default) = defer when ``model`` is a checkpoint folder,
            build here when it is ``"tiny"``. The processor is always loaded here (the DataModule
            reads it in ``setup``, which runs before ``configure_model``). A deferred module's
            ``model`` (and a reference model) is None until ``configure_model()`` runs; call it
            yourself to use the module outside a Trainer.
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
        defer_init: bool | None = None,
        lora: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model_name = model
        self.trainable = list(trainable)
        self.lora = None
        if lora is not None:
            from ..models.lora import LoraSettings

            self.lora = LoraSettings(**lora)
            both = sorted(set(self.trainable) & set(self.lora.parts))
            if both:
                raise ValueError(f"parts {both} are both trained in full (trainable) and adapted (lora.parts); with "
                                 f"LoRA, `trainable` lists the parts trained in full besides the adapters: set "
                                 f"`trainable: []` to train the adapters only")
            self.strict_loading = False  # a LoRA checkpoint holds the trained tensors only
        self.defer_init = (model != "tiny") if defer_init is None else bool(defer_init)
        self.model = None
        self.param_counts: dict[str, int] = {}
        # transformers' ZeRO-3 switch, held while this module runs under ZeRO-3 (see configure_model)
        self._hf_ds_config = None
        self.processor = load_policy_processor(self.model_name)
        if not self.defer_init:
            self._build()
        self.val_accuracy = MeanMetric()
        self.val_accuracy_letter_only = MeanMetric()  # multiple choice by its letter only (as evaluate)
        self.val_format = MeanMetric()
        self._t_last = None

    # ----------------------------------------------------------------- model
    def configure_model(self):
        """Build the policy if ``__init__`` deferred it (``defer_init``); a no-op once it exists.

        Lightning calls this hook at the start of every ``fit`` / ``validate`` / ``test`` /
        ``predict``, inside DeepSpeed's ``zero.Init`` under ZeRO-3. There it first keeps a
        ``transformers.integrations.HfDeepSpeedConfig`` alive on the module (until ``teardown``), so
        that ``from_pretrained`` loads the checkpoint into partitioned parameters and ``generate``
        syncs ranks. Why both are needed: docs/scale.md, "Loading at 38B".
        """
        ds_config = deepspeed_zero3_config(self._trainer)
        if ds_config is not None and self._hf_ds_config is None:
            self._hf_ds_config = hf_deepspeed_config(ds_config)
        if self.model is None:
            self._build()
        elif ds_config is not None and not self.defer_init and not is_zero3_partitioned(self.model):
            log.info("ZeRO-3 with defer_init=False: every rank loaded the whole policy in __init__; "
                     "DeepSpeed partitions it only now (set defer_init: true to load it partitioned)")

    def teardown(self, stage: str):
        # transformers' ZeRO-3 switch is process-wide (a weak reference): let it end with the run, so
        # that a later ``from_pretrained`` in this process (an export, an evaluation) loads normally.
        # A new Trainer run calls configure_model again, which re-creates it.
        self._hf_ds_config = None

    def _build(self):
        model = self._load_model()
        if self.lora is not None:
            from ..models.lora import add_lora

            add_lora(model, self.lora, seed=self.hparams.seed)
        self.param_counts = set_trainable(model, self.trainable, allow_none=self.lora is not None)
        if self.hparams.gradient_checkpointing:
            model.activation_checkpointing_enable()
        # ``from_pretrained`` returns the model in eval mode, and Lightning (2.2+) keeps submodules'
        # modes at fit start; transformers recomputes activations only ``if self.gradient_checkpointing
        # and self.training`` (``modeling_layers.py``), so a folder policy left in eval mode would
        # silently train without gradient checkpointing (and without dropout). The tiny default is
        # built in train mode already; evaluation code calls ``.eval()`` itself.
        self.model = model.train()

    def _load_model(self):
        """The policy as loaded: ``model`` (folder or tiny init), then ``init_ckpt``'s weights; nothing frozen yet."""
        model = load_policy_model(self.model_name, self.processor, dtype=self.hparams.dtype, seed=self.hparams.seed)
        if self.hparams.init_ckpt:
            load_policy_weights(model, self.hparams.init_ckpt)
        return model

    def frozen_policy_copy(self):
        """A frozen copy of the initial policy (eval mode, no gradients), for a reference model.

        A deep copy of ``self.model``, except when the policy is ZeRO-3 partitioned (built in
        ``configure_model`` under ZeRO-3): a deep copy of partitioned parameters copies their empty
        local slices and DeepSpeed's ids, which is not a model. The policy is then loaded a second
        time (``model`` and ``init_ckpt``), partitioned the same way; call it from
        ``configure_model`` (inside Lightning's ``zero.Init``) and before the first update.
        """
        if self.lora is not None:  # the base policy: the same weights with the adapters off
            from ..models.lora import AdaptersOff

            return AdaptersOff(self.model)
        ref = self._load_model() if is_zero3_partitioned(self.model) else copy.deepcopy(self.model)
        return ref.eval().requires_grad_(False)

    def policy(self):
        """What a rollout engine needs (``rollout.base.Policy``): model, processor, device, step, trainer."""
        from ..rollout.base import as_policy

        return as_policy(self)

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
        save_rng_states(checkpoint)  # every rank's (collective: Lightning calls this hook on all ranks)
        if self.lora is not None and "state_dict" in checkpoint:  # the trained tensors and where the rest is
            trained = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
            checkpoint["r1v2_lora"] = {"base": self.model_name, "init_ckpt": self.hparams.init_ckpt,
                                       "settings": dict(self.hparams.lora)}

    def on_load_checkpoint(self, checkpoint):
        # restored in on_train_start: after Lightning's seeding, set-up and first ``iter(loader)``
        self._pending_rng_state = saved_rng_state(checkpoint)
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
        decay = [p for p in params if param_ndim(p) >= 2]  # full shape: a ZeRO-3 partition is 1-D
        no_decay = [p for p in params if param_ndim(p) < 2]
        # an empty group is left out: ZeRO-3 drops it from the optimizer it builds, and the LR
        # schedule (one base LR per group, made here) then no longer matches (LoRA trains 2-D tensors only)
        groups = [g for g in ({"params": decay, "weight_decay": self.hparams.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        opt = torch.optim.AdamW(
            groups,
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            fused=_fused_adamw_ok(params),  # one kernel for all tensors (TRL's default adamw_torch_fused)
        )
        total = max(1, self._total_steps())
        warmup = int(self.hparams.warmup_ratio * total)
        floor = self.hparams.min_lr_ratio
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total, floor))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _total_steps(self) -> int:
        return int(self.trainer.estimated_stepping_batches)

    # ------------------------------------------------------------ evaluation
    def model_inputs(self, batch: dict, model=None) -> dict:
        """Forward kwargs of a collated batch (ids, mask, positions, its rows' media and token inputs)."""
        model = model or self.model
        return policy_io(self.processor).model_inputs(batch["input_ids"], batch["attention_mask"], batch["media"],
                                                      batch.get("token_inputs"), dtype=model.dtype)

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int, do_sample: bool = False, **kw) -> list[str]:
        """Batched generation from a ``PromptCollator`` batch; returns decoded completions (cut at
        the first stop token, padding dropped)."""
        from ..rollout.hf_engine import completion_mask_from_eos, decode_completions

        from lightning.fabric.utilities.apply_func import move_data_to_device

        io = policy_io(self.processor)
        batch = move_data_to_device(batch, self.device)  # the evaluate job collates on the CPU
        inputs = self.model_inputs(batch)
        inputs.pop("position_ids", None)  # generate numbers them (as the scoring pass does)
        out = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=io.pad_id,
            eos_token_id=io.stop_ids,
            suppress_tokens=io.blocked_ids,
            **kw,
        )
        ids = out[:, batch["input_ids"].shape[1]:]  # [B, C]
        mask, _ = completion_mask_from_eos(ids, io.stop_ids)
        return decode_completions(self.tokenizer, ids, mask, io)

    def validation_step(self, batch, batch_idx):
        from ..rewards.rules import held_out_scores

        texts = self.generate(batch, self.hparams.eval_max_new_tokens)
        recs = batch["records"]
        scores = held_out_scores(texts, recs)
        self.val_accuracy.update(torch.tensor(scores["accuracy"], device=self.device))
        self.val_accuracy_letter_only.update(torch.tensor(scores["accuracy_letter_only"], device=self.device))
        self.val_format.update(torch.tensor(scores["format"], device=self.device))
        self.log("val/accuracy", self.val_accuracy, on_epoch=True, prog_bar=True, batch_size=len(recs))
        self.log("val/format", self.val_format, on_epoch=True, prog_bar=True, batch_size=len(recs))
        self.log("val/accuracy_letter_only", self.val_accuracy_letter_only, on_epoch=True, batch_size=len(recs))

    # --------------------------------------------------------------- timing
    def _throughput(self, tokens: int) -> float:
        now = time.perf_counter()
        rate = 0.0 if self._t_last is None else tokens / max(now - self._t_last, 1e-9)
        self._t_last = now
        return rate


def clean_completion(text: str, tokenizer) -> str:
    """Cut a decoded completion at the end-of-turn token and drop padding."""
    eos = tokenizer.eos_token
    if eos and eos in text:
        text = text[: text.index(eos)]
    return text.replace(tokenizer.pad_token or "", "")


def _fused_adamw_ok(params: list) -> bool:
    """Fused AdamW needs floating-point tensors on a CPU or CUDA device (else torch picks its default)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine from 1 to ``floor`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
