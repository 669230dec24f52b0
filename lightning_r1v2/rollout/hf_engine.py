"""The embedded default rollout engine: batched Hugging Face ``generate`` with a KV cache.

It samples ``G`` completions per prompt in one batched call and records the behaviour policy's
per-token log-probs while sampling (``log_softmax(logits / temperature)`` at the sampled token),
so the GRPO step does not need an extra forward pass before its first update. Only one step's
distribution is held at a time, never ``[steps, N, V]``.

With ``share_prompt_prefill`` (default) each prompt, image included, is prefilled once and its
KV cache repeated for the ``G`` samples, instead of running the vision tower and the prompt ``G``
times.

Chosen in YAML by ``class_path``; the vLLM engine has the same ``generate(policy, batch, G)``.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..utils.distributed import deepspeed_zero3_config, world_and_rank
from .base import RolloutEngine, as_policy, rollouts_from_samples
from ..models.inputs import policy_io
from .types import Rollouts


class _LogprobRecorder(LogitsProcessor):
    """Keeps log p(token) of each sampled token, computed from the raw (pre-warper) logits."""

    def __init__(self, temperature: float, blocked: list[int]):
        self.temperature = temperature
        self.blocked = blocked
        self.prev: torch.Tensor | None = None  # [N, V] log-probs of the last step
        self.taken: list[torch.Tensor] = []  # each [N]

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.taken.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1))
        scores = scores.clone()
        scores[:, self.blocked] = float("-inf")  # the same distribution the training forward scores
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self.taken.append(self.prev.gather(-1, last_tokens[:, None]).squeeze(-1))
        return torch.stack(self.taken, dim=1)  # [N, C]


class HFGenerateEngine(RolloutEngine):
    """Samples completions with ``model.generate``.

    Args:
        max_new_tokens: Longest completion (R1V1: 8K; R1V3: 4K -> 8K).
        temperature: Sampling temperature (R1V1: 1.0).
        top_p: Nucleus sampling mass (1.0: off).
        top_k: Top-k sampling (0: off).
        record_logprobs: Record the behaviour policy's log-probs while sampling.
        gather_zero3: Under DeepSpeed ZeRO-3, gather the parameters once for the whole
            generation (much faster than per-layer gathering; needs the whole model's
            parameters on each GPU for that time). Off: DeepSpeed gathers layer by layer in
            each forward, and ``generate`` runs with ``synced_gpus=True`` in a multi-rank run
            (a rank whose samples all ended keeps stepping, so the others' gathers never hang).
        share_prompt_prefill: Prefill each prompt once and repeat its KV cache ``G`` times
            (off: the prompt and image run ``G`` times, as plain ``generate`` does). Applies to the
            dynamic cache only.
        cache: ``"dynamic"`` (a growing KV cache), ``"static"`` (preallocated to the longest
            prompt + ``max_new_tokens``; on CUDA transformers compiles the decoding step with
            ``torch.compile`` and replays it as a CUDA graph: the per-token Python and kernel-launch
            overhead that dominates small-batch decoding goes away), or None: static on CUDA,
            dynamic elsewhere. Same tokens and recorded log-probs either way (tested on CPU).
    """

    def __init__(
        self,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        record_logprobs: bool = True,
        gather_zero3: bool = True,
        share_prompt_prefill: bool = True,
        cache: str | None = None,
    ):
        super().__init__(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        if cache not in (None, "dynamic", "static"):
            raise ValueError(f"cache must be 'dynamic', 'static' or None (static on CUDA), got {cache!r}")
        self.cache = cache
        self.record_logprobs = record_logprobs
        self.gather_zero3 = gather_zero3
        self.share_prompt_prefill = share_prompt_prefill

    @torch.no_grad()
    def generate(self, policy, batch: dict, group_size: int) -> Rollouts:
        """``G`` samples for each prompt of ``batch`` (a ``PromptCollator`` batch)."""
        policy = as_policy(policy)
        model, processor = policy.model, policy.processor
        io = policy_io(processor)
        G = group_size
        device = policy.device
        input_ids = batch["input_ids"].to(device).repeat_interleave(G, dim=0)  # [N, P]
        attention_mask = batch["attention_mask"].to(device).repeat_interleave(G, dim=0)  # [N, P]
        token_inputs = {k: v.to(device).repeat_interleave(G, dim=0) for k, v in batch.get("token_inputs", {}).items()}
        media = [{k: t.to(device) for k, t in m.items()} for m in batch["media"]]  # one dict per prompt
        row_media = [m for m in media for _ in range(G)]  # [N] the G rows of a prompt share its dict
        blocked = io.blocked_ids
        recorder = _LogprobRecorder(self.temperature, blocked) if self.record_logprobs else None
        was_training = model.training
        model.eval()
        with _gathered(policy, self.gather_zero3) as gathered:
            kw = io.model_inputs(input_ids, attention_mask, row_media, token_inputs, dtype=model.dtype)
            kw.pop("position_ids", None)  # generate numbers positions itself (as the scoring pass does)
            static = self.cache_kind(device) == "static"
            if static:
                kw["cache_implementation"] = "static"
            elif self.share_prompt_prefill and G > 1 and io.family.share_prompt and _can_prefill(batch, blocked):
                kw = {k: v for k, v in kw.items() if k in ("input_ids", "attention_mask")}
                kw["cache"] = _prefill(model, batch, G, io, media)
            if gathered.layerwise_zero3:
                kw["synced_gpus"] = True
            out = model.generate(
                **kw,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=io.pad_id,
                eos_token_id=io.stop_ids,
                logits_processor=LogitsProcessorList([recorder]) if recorder else None,
                suppress_tokens=blocked,
                **self.sampling_kwargs(),
            )
        model.train(was_training)
        P = input_ids.shape[1]
        completion_ids = out[:, P:]  # [N, C]
        completion_mask, truncated = completion_mask_from_eos(completion_ids, io.stop_ids)
        old_logprobs = recorder.finish(completion_ids[:, -1]) if recorder is not None else None  # [N, C]
        return rollouts_from_samples(dict(batch, media=media), G, input_ids, attention_mask, completion_ids,
                                     completion_mask, truncated, old_logprobs, io)


    def cache_kind(self, device) -> str:
        """The KV cache ``generate`` uses on ``device``: the ``cache`` setting, or static on CUDA."""
        if self.cache is not None:
            return self.cache
        return "static" if torch.device(device).type == "cuda" else "dynamic"


def _can_prefill(batch: dict, blocked: list[int]) -> bool:
    """The prompts' last column holds no image placeholder (``generate`` then needs no pixels)."""
    last = batch["input_ids"][:, -1]  # [B]
    blocked_t = torch.tensor(blocked, dtype=last.dtype, device=last.device)
    return batch["input_ids"].shape[1] > 1 and not torch.isin(last, blocked_t).any()


def _prefill(model, batch: dict, G: int, io, media: list[dict]):
    """KV cache of ``prompt[:, :-1]`` (image included) computed once per prompt, repeated ``G`` times.

    ``generate`` then runs only the last prompt token and the samples; positions are numbered as
    ``generate`` numbers them (left padding skipped), so the cache equals the one it would build.
    """
    device = media[0]["pixel_values"].device if media and "pixel_values" in media[0] else batch["input_ids"].device
    ids = batch["input_ids"][:, :-1].to(device)  # [B, P-1]
    mask = batch["attention_mask"][:, :-1].to(device)  # [B, P-1]
    kw = io.model_inputs(ids, mask, media, None, dtype=model.dtype)
    out = model(**kw, use_cache=True, logits_to_keep=1)
    cache = out.cache
    cache.batch_repeat_interleave(G)  # [B, ...] -> [B*G, ...], rows of a prompt contiguous
    return cache


def decode_completions(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor, io=None) -> list[str]:
    """Completion texts without stop tokens and padding, but WITH reasoning markers such as ``<think>``.

    ``skip_special_tokens=True`` would also drop ``<think>``/``</think>`` (special tokens in
    many VLM tokenizers), and the format reward would then never see them.
    """
    drop = set(io.stop_ids) | {io.pad_id} if io is not None else {tokenizer.eos_token_id, tokenizer.pad_token_id}
    rows = [[t for t, m in zip(ids.tolist(), mask.tolist()) if m and t not in drop]
            for ids, mask in zip(completion_ids, completion_mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=False)


def blocked_token_ids(processor) -> list[int]:
    """Tokens a completion must never contain: image/video placeholders, image markers, padding
    (``PolicyIO.blocked_ids``: from the tokenizer, the processor and the model config).

    A sampled image placeholder would make the next forward pass see more image tokens than
    images (the "image features and image tokens do not match" crash of EasyR1 110 / verl 3469).
    """
    return policy_io(processor).blocked_ids


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_id) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of tokens up to and including the first stop token (``eos_id``: one id or a list);
    and which rows have no stop token (truncated)."""
    stops = torch.as_tensor(eos_id if isinstance(eos_id, (list, tuple)) else [eos_id], device=completion_ids.device)
    is_eos = torch.isin(completion_ids, stops)  # [N, C]
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # [N, C] a stop strictly before
    mask = (~seen_before).long()
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


class _gathered:
    """Gather ZeRO-3 partitioned parameters once for a whole generation; a no-op elsewhere.

    With the DeepSpeed engine at hand (``trainer.strategy.model`` during fit) this is DeepSpeed's
    own ``unwrap_model_for_generation`` (one rank; several ranks gather only, see below): every
    parameter gathered once, and ZeRO-3's per-module
    forward hooks removed for the generation (re-registered after). Gathering alone leaves the
    hooks in place, and they run their fetch/release bookkeeping for every module at every decoding
    step (the 667M ZeRO-3 step stalled there on an H100). Without an engine (outside ``fit``) the
    parameters are gathered with ``GatheredParameters``.
    """

    def __init__(self, policy, enabled: bool):
        self.ctx = None
        self.unhooked = False
        policy = as_policy(policy)
        trainer = policy.trainer
        zero3 = deepspeed_zero3_config(trainer) is not None
        # partitioned, not gathered, several ranks: each forward is a collective, so generate must sync
        self.layerwise_zero3 = zero3 and not enabled and world_and_rank()[0] > 1
        if enabled and zero3:
            import deepspeed

            engine = getattr(getattr(trainer, "strategy", None), "model", None)
            one_rank = world_and_rank()[0] == 1  # on two CPU ranks the unhooked forward met a partitioned
            #   embedding ("weight must be 2-D"): several ranks keep the gather-only path until that is understood
            if one_rank and isinstance(engine, deepspeed.DeepSpeedEngine) and getattr(engine, "optimizer", None) is not None:
                from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

                self.ctx = unwrap_model_for_generation(engine)
                self.unhooked = True
            else:
                self.ctx = deepspeed.zero.GatheredParameters(list(policy.model.parameters()), modifier_rank=None)

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False
