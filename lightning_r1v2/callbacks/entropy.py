"""R1V3's checkpoint-selection signal: the entropy of critical reasoning tokens (arXiv 2507.06167).

On a fixed probe set (the first ``num_prompts`` prompts of ``data_file``, one completion each,
fixed seed, forked RNG), the entropy H_t = -sum_v p(v | x, y_<t) log p(v | x, y_<t) of the
distribution that chose each completion token is aggregated over the positions whose token is a
critical one ("Wait", "Alternatively", "But", ..., optionally ``</think>``). Logged as
``entropy/critical_mean`` (``ModelCheckpoint(monitor=..., mode="max")`` can select on it),
``entropy/critical_count``, ``entropy/mean`` and ``entropy/high_share``.

Departures from the paper and a YAML example: docs/components.md, "Critical-token entropy".
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback
from torch import Tensor

from ..data.collate import PromptCollator
from ..rollout.scoring import completion_logits
from ..data.records import read_records
from ..losses import entropy_from_logits
from ..rollout.hf_engine import HFGenerateEngine

__all__ = ["AGGREGATIONS", "critical_entropy", "critical_token_ids", "CriticalTokenEntropy"]

log = logging.getLogger("lightning_r1v2.callbacks")

AGGREGATIONS = ("mean", "median", "max", "sequence_mean")


def critical_entropy(
    entropies: Tensor, next_token_ids: Tensor, mask: Tensor, critical_ids: set[int], aggregation: str = "mean"
) -> tuple[float, int]:
    """Aggregate entropy at the positions whose next token is critical.

    Args:
        entropies: ``[N, T]`` entropy (nats) of the distribution at position t.
        next_token_ids: ``[N, T]`` the token chosen at position t.
        mask: ``[N, T]`` 1 on real completion positions.
        critical_ids: token ids that mark a critical position.
        aggregation: ``mean`` (over all critical positions pooled), ``median``, ``max``, or
            ``sequence_mean`` (each completion's mean, then the mean over completions that have one).

    Returns:
        ``(value, count)``: the aggregate (NaN when ``count`` is 0) and the number of critical positions.

    Example:
        entropies [[ln 4, 0, 1], [2, 0.5, 3]], next ids [[7, 5, 7], [7, 9, 7]], mask [[1, 1, 1],
        [1, 1, 0]], critical {7}: positions (0,0), (0,2), (1,0) -> mean (ln 4 + 1 + 2) / 3, count 3.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if not (entropies.shape == next_token_ids.shape == mask.shape):
        raise ValueError(f"shapes differ: {tuple(entropies.shape)}, {tuple(next_token_ids.shape)}, {tuple(mask.shape)}")
    ids = torch.tensor(sorted(critical_ids), dtype=torch.long, device=next_token_ids.device)
    sel = mask.bool() & torch.isin(next_token_ids.long(), ids)  # [N, T]
    count = int(sel.sum())
    if count == 0:
        return float("nan"), 0
    ent = entropies.detach().float()
    if aggregation == "sequence_mean":
        per_row = (ent * sel).sum(1) / sel.sum(1).clamp(min=1)  # [N]
        return float(per_row[sel.any(1)].mean()), count
    vals = ent[sel]  # [count]
    value = {"mean": vals.mean, "median": vals.median, "max": vals.max}[aggregation]()
    return float(value), count


CRITICAL_TOKENS = ("Wait", "But", "Alternatively", "Hmm", "However", "Let")  # where a chain of thought turns


def critical_token_ids(tokenizer, tokens: list[str], include_think_end: bool = True) -> tuple[set[int], list[str]]:
    """Token ids that mark a critical position, and the entries of ``tokens`` that matched none.

    An entry matches the token with exactly that string, and every token that decodes (stripped,
    case-insensitive) to it. ``include_think_end`` adds the ``</think>`` token when it is one token.
    """
    unk = tokenizer.unk_token_id
    ids: set[int] = set()
    unmatched: list[str] = []
    vocab_size = len(tokenizer)
    decoded = [s.strip().lower() for s in tokenizer.batch_decode([[i] for i in range(vocab_size)])]
    for word in tokens:
        found = set()
        exact = tokenizer.convert_tokens_to_ids(word)
        if isinstance(exact, int) and exact >= 0 and (exact != unk or word == tokenizer.unk_token):
            found.add(exact)
        key = word.strip().lower()
        if key:
            found.update(i for i, s in enumerate(decoded) if s == key)
        if not found:
            unmatched.append(word)
        ids |= found
    if include_think_end:
        end = getattr(tokenizer, "think_end_token", None) or "</think>"
        end_ids = tokenizer.encode(end, add_special_tokens=False)
        if len(end_ids) == 1 and end_ids[0] != unk:
            ids.add(end_ids[0])
        else:
            unmatched.append(end)
    return ids, unmatched


class CriticalTokenEntropy(Callback):
    """Log the entropy at critical reasoning tokens on a fixed probe set (R1V3's selection signal).

    Runs every ``every_n_steps`` optimizer steps (in ``on_train_batch_end``) and at the end of
    every validation loop (not in the sanity check). Works with any ``PolicyModule`` (it uses
    ``pl_module.model`` and ``pl_module.processor``). ``last_stats`` holds the last measurement;
    ``history`` every ``(step, stats)``.
    """

    def __init__(
        self,
        data_file: str = "data/tiny/val.jsonl",
        num_prompts: int = 32,
        tokens: list[str] = CRITICAL_TOKENS,
        include_think_end: bool = True,
        high_entropy_threshold: float = 6.8,
        every_n_steps: int = 50,
        on_validation: bool = True,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        seed: int = 0,
        aggregation: str = "mean",
        batch_size: int = 32,
    ):
        """
        Args:
            data_file: JSONL of prompts (records as in ``data/records.py``); the probe set.
            num_prompts: Use the first N prompts of ``data_file`` (fixed, so checkpoints compare).
            tokens: Reasoning-turn words or token strings; see the module docstring for matching.
            include_think_end: Also count the position that emits ``</think>`` (the decision to
                stop reasoning), so a model that never says "Wait" still gives a value.
            high_entropy_threshold: Nats; ``entropy/high_share`` is the share of completion tokens
                above it (6.8 in R1V3).
            every_n_steps: Measure every N optimizer steps during training (0: never).
            on_validation: Also measure at the end of every validation loop.
            max_new_tokens: Length of the sampled probe completions.
            temperature: Sampling temperature; the entropy is that of ``softmax(logits / temperature)``.
            seed: Seed of the probe sampling (same seed, same stream at every measurement).
            aggregation: ``mean``, ``median``, ``max`` or ``sequence_mean`` over critical positions.
            batch_size: Prompts per generation/forward batch.
        """
        super().__init__()
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0: never), got {every_n_steps}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not tokens and not include_think_end:
            raise ValueError("no critical tokens: give `tokens` or set include_think_end")
        self.data_file = data_file
        self.num_prompts = int(num_prompts)
        self.tokens = list(tokens)
        self.include_think_end = bool(include_think_end)
        self.high_entropy_threshold = float(high_entropy_threshold)
        self.every_n_steps = int(every_n_steps)
        self.on_validation = bool(on_validation)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.seed = int(seed)
        self.aggregation = aggregation
        self.batch_size = int(batch_size)
        self.engine = HFGenerateEngine(max_new_tokens=max_new_tokens, temperature=temperature, record_logprobs=False)
        self._records: list[dict] | None = None
        self._critical: set[int] | None = None
        self._last_step = 0
        self._cache: tuple[tuple, dict] | None = None  # ((trainer id, step), stats) measured during fit
        self.last_stats: dict[str, float] = {}
        self.history: list[tuple[int, dict]] = []

    # -- measuring ------------------------------------------------------------------------------------

    def probe_records(self) -> list[dict]:
        """The first ``num_prompts`` records of ``data_file`` (read once)."""
        if self._records is None:
            records, _ = read_records(self.data_file)
            if not records:
                raise ValueError(f"{self.data_file}: no records to probe")
            self._records = records[: self.num_prompts]
        return self._records

    def critical_ids(self, tokenizer) -> set[int]:
        """The critical token ids for ``tokenizer`` (resolved once, unmatched entries logged)."""
        if self._critical is None:
            self._critical, unmatched = critical_token_ids(tokenizer, self.tokens, self.include_think_end)
            if unmatched:
                log.warning("critical tokens that are not one token of this tokenizer (never matched): %s", unmatched)
        return self._critical

    @torch.no_grad()
    def measure(self, pl_module) -> dict[str, float]:
        """Sample the probe completions with the current policy and return the entropy stats."""
        model, processor = pl_module.model, pl_module.processor
        tok = processor.tokenizer
        critical = self.critical_ids(tok)
        records = self.probe_records()
        device = next(model.parameters()).device
        collate = PromptCollator(processor)
        ents, nexts, masks = [], [], []
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                for i in range(0, len(records), self.batch_size):
                    batch = collate(records[i : i + self.batch_size])
                    batch = move_data_to_device(batch, device)
                    rows = self.engine.generate(pl_module.policy(), batch, 1)
                    ents.append(self._entropies(model, rows, processor).cpu())  # [n, C]
                    nexts.append(rows.completion_ids.cpu())  # [n, C]
                    masks.append(rows.completion_mask.cpu())  # [n, C]
        finally:
            model.train(was_training)
        C = max(e.shape[1] for e in ents)
        ent = torch.cat([F.pad(e, (0, C - e.shape[1])) for e in ents])  # [N, C]
        nxt = torch.cat([F.pad(n, (0, C - n.shape[1])) for n in nexts])  # [N, C]
        mask = torch.cat([F.pad(m, (0, C - m.shape[1])) for m in masks]).bool()  # [N, C]
        value, count = critical_entropy(ent, nxt, mask, critical, self.aggregation)
        tokens = ent[mask]  # [n_tokens] every completion token
        high = (tokens > self.high_entropy_threshold).float()  # [n_tokens]
        empty = tokens.numel() == 0
        return {
            "entropy/critical_mean": value,
            "entropy/critical_count": float(count),
            "entropy/mean": float("nan") if empty else float(tokens.mean()),
            "entropy/high_share": float("nan") if empty else float(high.mean()),
        }

    def _entropies(self, model, rows, processor) -> Tensor:
        """``[n, C]`` entropy of the distribution that chose each completion token."""
        logits = completion_logits(model, rows, self.temperature, processor).float()  # [n, C, V]
        return entropy_from_logits(logits)  # [n, C]

    def _stats(self, trainer, pl_module) -> dict[str, float]:
        # within one fit, a validation at the step just measured has the same weights and seed: reuse
        key = (id(trainer), int(trainer.global_step))
        fitting = trainer.state.fn == "fit"
        if fitting and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        stats = self.measure(pl_module)
        self._cache = (key, stats) if fitting else None
        step = key[1]
        self.last_stats = stats
        self.history.append((step, stats))
        return stats

    # -- Lightning hooks --------------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: D102
        self._last_step = int(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        n, step = self.every_n_steps, int(trainer.global_step)
        if not n or step // n <= self._last_step // n:
            return
        self._last_step = step
        stats = self._stats(trainer, pl_module)
        # logger=False: Lightning sends step metrics to loggers only every log_every_n_steps, so
        # the loggers get them directly; pl_module.log puts them in callback_metrics for
        # ModelCheckpoint (which runs after every other callback).
        for k, v in stats.items():
            pl_module.log(k, v, on_step=True, on_epoch=False, logger=False, batch_size=1)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({k: v for k, v in stats.items() if not math.isnan(v)}, step=step)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        if not self.on_validation or trainer.sanity_checking:
            return
        stats = self._stats(trainer, pl_module)
        for k, v in stats.items():
            pl_module.log(k, v, on_step=False, on_epoch=True, batch_size=1)

    @property
    def state_key(self) -> str:  # noqa: D102
        return self._generate_state_key(data_file=self.data_file, num_prompts=self.num_prompts, seed=self.seed)

    def state_dict(self) -> dict:
        """The measurements so far (``history``), so a resumed run keeps them."""
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores ``history`` and, from its last entry, ``last_stats`` (logged with every GRPO row)."""
        self.history = list(state_dict.get("history", []))
        self.last_stats = dict(self.history[-1][1]) if self.history else {}
