"""The ``Rollouts`` batch: what one GRPO step passes between the engine, callbacks and loss.

One row per sampled completion; ``B`` prompts times ``G`` completions each gives ``N = B*G`` rows.
Rows of one group are contiguous (row ``i`` belongs to prompt ``i // G`` of the step) until the
Selective Sample Buffer reorders them; after that ``group_ids`` is the truth.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F


@dataclass
class Rollouts:
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P] 1 on real tokens
    completion_ids: torch.Tensor  # [N, C] right-padded
    completion_mask: torch.Tensor  # [N, C] 1 on generated tokens up to and including EOS
    media: list[dict]  # [N] each row's own media (pixel_values of all its images/tiles, image grids); rows of a group share one dict
    completions: list[str]  # [N] decoded completion text: stop tokens and padding dropped, <think> markers kept
    records: list[dict]  # [N] the source record of each row (answer, annotations, choices, tests, id)
    group_ids: torch.Tensor  # [N] long, rows with the same id were sampled for the same prompt
    group_size: int  # G
    old_logprobs: torch.Tensor | None = None  # [N, C] behaviour policy's per-token log-probs
    ref_logprobs: torch.Tensor | None = None  # [N, C] reference policy's, when kl_coef > 0
    truncated: torch.Tensor | None = None  # [N] bool, hit max_new_tokens without EOS
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N] float, NaN = n/a
    reward: torch.Tensor | None = None  # [N] combined reward
    advantages: torch.Tensor | None = None  # [N] sequence-level advantage
    from_buffer: torch.Tensor | None = None  # [N] bool, row was replayed by the buffer
    dropped: torch.Tensor | None = None  # [N] bool, row excluded from the loss (e.g. reward fault)
    token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N, P] per prompt token, left-padded

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def num_groups(self) -> int:
        return int(self.group_ids.unique().numel())

    def columns(self) -> dict[str, list]:
        """Record fields broadcast per row, as TRL-style reward functions take them as kwargs."""
        keys: list[str] = []
        for r in self.records:
            keys.extend(k for k in r if k not in keys)
        return {k: [r.get(k) for r in self.records] for k in keys}

    def select(self, index: torch.Tensor | list[int]) -> Rollouts:
        """The rows at ``index`` (in that order), every per-row field sliced alike."""
        idx = torch.as_tensor(index, dtype=torch.long)  # on CPU: moved to each field's device below
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v[idx.to(v.device)]
            elif isinstance(v, dict):
                out[f.name] = {k: t[idx.to(t.device)] for k, t in v.items()}
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in idx.tolist()]
            else:
                out[f.name] = v
        return Rollouts(**out)

    @staticmethod
    def concat(parts: list[Rollouts], pad_token_id: int = 0) -> Rollouts:
        """Stack rollouts of possibly different prompt/completion lengths (re-padding as needed)."""
        parts = [p for p in parts if len(p) > 0]
        if len(parts) == 1:
            return parts[0]
        P = max(p.prompt_ids.shape[1] for p in parts)
        C = max(p.completion_ids.shape[1] for p in parts)

        def left(t, width, value):
            return F.pad(t, (width - t.shape[1], 0), value=value)

        def right(t, width, value):
            return F.pad(t, (0, width - t.shape[1]), value=value)

        out: dict = {}
        for f in fields(Rollouts):
            vals = [getattr(p, f.name) for p in parts]
            name = f.name
            if name in ("prompt_ids", "prompt_mask"):
                value = pad_token_id if name == "prompt_ids" else 0
                out[name] = torch.cat([left(v, P, value) for v in vals])
            elif name == "token_inputs":
                keys = vals[0].keys()
                out[name] = {k: torch.cat([left(v[k], P, 0) for v in vals]) for k in keys if all(k in v for v in vals)}
            elif name in ("completion_ids", "completion_mask", "old_logprobs", "ref_logprobs"):
                if any(v is None for v in vals):
                    out[name] = None
                    continue
                value = pad_token_id if name == "completion_ids" else 0
                out[name] = torch.cat([right(v, C, value) for v in vals])
            elif name == "group_size":
                out[name] = vals[0]
            elif name == "rewards":
                keys = vals[0].keys()
                out[name] = {k: torch.cat([v[k] for v in vals]) for k in keys if all(k in v for v in vals)}
            elif isinstance(vals[0], list):
                out[name] = [x for v in vals for x in v]
            elif any(v is None for v in vals):
                out[name] = None
            else:
                out[name] = torch.cat(vals)
        return Rollouts(**out)

    def map_tensors(self, fn) -> Rollouts:
        """A copy with ``fn`` applied to every tensor (fields, reward columns, token inputs, media);
        rows that shared one media dict still share one."""
        out = {}
        memo: dict[int, dict] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = fn(v)
            elif isinstance(v, dict):
                v = {k: fn(t) for k, t in v.items()}
            elif f.name == "media":
                v = [memo.setdefault(id(m), {k: fn(t) for k, t in m.items()}) for m in v]
            out[f.name] = v
        return Rollouts(**out)

    def to(self, device) -> Rollouts:
        """Every tensor of the batch on ``device`` (the one place a ``Rollouts`` moves)."""
        return self.map_tensors(lambda t: t.to(device))

    def trim_padding(self) -> Rollouts:
        """Drop padding columns that no row uses (right of completions, left of prompts)."""
        if len(self) == 0:
            return self
        cols = self.completion_mask.bool().any(0).nonzero()
        c = int(cols.max()) + 1 if cols.numel() else 1
        pcols = self.prompt_mask.bool().any(0).nonzero()
        p0 = int(pcols.min()) if pcols.numel() else self.prompt_mask.shape[1] - 1
        kw = {name: getattr(self, name)[:, :c] for name in ("completion_ids", "completion_mask")}
        for name in ("old_logprobs", "ref_logprobs"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)[:, :c]
        kw.update(prompt_ids=self.prompt_ids[:, p0:], prompt_mask=self.prompt_mask[:, p0:],
                  token_inputs={k: v[:, p0:] for k, v in self.token_inputs.items()})
        return replace(self, **kw)
