"""A learned reward model as a reward function (R1V2's ``r_rm``; Skywork-VL Reward in the paper).

``RewardModelScorer`` wraps any model with a scalar head: a text-only
``AutoModelForSequenceClassification`` loaded from a local directory, or any ``nn.Module`` whose
output has ``.logits`` of shape ``[B, 1]`` or ``[B]`` (a VLM reward model), with its tokenizer or
processor. An instance is a reward function (``scorer(completions, **columns)``), so
``RewardCallback(fn=scorer)`` uses it like the rule rewards.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["RewardModelScorer", "build_tiny_reward_model"]


class RewardModelScorer:
    """Scores ``prompt + "\\n" + completion`` with a scalar-head model, in batches, without grad.

    Args:
        path: local directory with the model and its tokenizer/processor (``save_pretrained``
            output); loaded with ``local_files_only=True``. Ignored when ``model`` is given.
        model: an already built scoring module (``.logits`` ``[B, 1]`` or ``[B]``).
        tokenizer: its tokenizer or processor (called as ``tokenizer(text=..., images=...)``).
        device: where to run; ``dtype``: load dtype (default float32).
        max_length: longest input in tokens; longer inputs lose their *beginning* (the answer is
            at the end).
        name: the column name ``RewardCallback`` uses by default.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        model: nn.Module | None = None,
        tokenizer=None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_length: int = 2048,
        name: str = "reward_model",
    ):
        if model is None:
            if path is None:
                raise ValueError("give a model directory (path) or a model")
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), local_files_only=True, num_labels=1, dtype=dtype or torch.float32
            )
        if tokenizer is None:
            if path is None:
                raise ValueError("give a tokenizer/processor along with the model")
            tokenizer = _load_tokenizer(str(path))
        tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
        # Right padding keeps position ids equal to the unpadded ones (batched == one at a time);
        # left truncation keeps the answer.
        tok.padding_side = "right"
        tok.truncation_side = "left"
        if tok.pad_token is None and tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_length = int(max_length)
        self.__name__ = name

    def texts(self, completions: list[str], prompts: list[str] | None) -> list[str]:
        """The scored strings: ``prompt + "\\n" + completion``, or the completion alone."""
        if prompts is None:
            return [str(c) for c in completions]
        return [f"{p}\n{c}" if p else str(c) for p, c in zip(prompts, completions)]

    @torch.no_grad()
    def __call__(
        self,
        completions: list[str],
        prompts: list[str] | None = None,
        images: list | None = None,
        batch_size: int = 16,
        **kwargs,
    ) -> list[float]:
        """One scalar per completion. Without ``prompts``, the records' ``question`` (or ``prompt``)
        column is used when present. ``images`` go to the processor (VLM reward models) as given.
        """
        if prompts is None:
            prompts = kwargs.get("prompt") or kwargs.get("question")
        texts = self.texts(completions, prompts)
        scores: list[float] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            call = {"text": chunk, "return_tensors": "pt", "padding": True, "truncation": True, "max_length": self.max_length}
            if images is not None:
                call["images"] = images[start : start + batch_size]
            enc = self.tokenizer(**call)
            enc = {k: v.to(self.device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
            enc.pop("token_type_ids", None)
            out = self.model(**enc)
            logits = out.logits if hasattr(out, "logits") else out
            if logits.dim() == 2 and logits.shape[-1] == 1:
                logits = logits[:, 0]
            if logits.dim() != 1 or logits.shape[0] != len(chunk):
                raise ValueError(f"reward model must return [B, 1] or [B] scores, got {tuple(logits.shape)}")
            scores.extend(logits.float().cpu().tolist())
        return scores


def _load_tokenizer(path: str):
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - a VLM directory may only load as a processor
        return AutoProcessor.from_pretrained(path, local_files_only=True)


def build_tiny_reward_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random ``Qwen2ForSequenceClassification`` (hidden 32, 2 layers, one label) and the
    project's tiny tokenizer to ``out_dir``, for offline tests and examples. Returns ``out_dir``."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from lightning_r1v2.models.tiny import build_tokenizer

    out = Path(out_dir)
    tok = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForSequenceClassification(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
