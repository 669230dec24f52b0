# PROTOTYPE (not used by the library): the four speed-ups measured by benchmarks/vs_trl.py
# (shared prompt prefix in the update and in generate, logging only on logging steps, fused AdamW).
# Run: python benchmarks/vs_trl.py --ours-module benchmarks.fast_grpo_prototype.FastGRPO --ours-engine benchmarks.fast_grpo_prototype.FastEngine
# To be folded into rollout/scoring.py and rollout/hf_engine.py (issue 10).
"""PROTOTYPE (not in the repo): GRPOModule/HFGenerateEngine with the proposed changes, to measure them.

A. shared prompt prefix in the update: the prompt of each group runs once (B rows, with its image),
   its KV cache (kept in the autograd graph) is repeated G times, the completions run on it.
B. shared prefill in generate: prompt[:, :-1] prefilled once per group, cache repeated G times.
C. log_dict only on logging steps (and never without a logger).
D. fused AdamW.
Each switchable by env FAST=ABCD letters.
"""
import os
import torch
from transformers import LogitsProcessorList
from lightning_r1v2.modules import GRPOModule
from lightning_r1v2.rollout import HFGenerateEngine
from lightning_r1v2.rollout.hf_engine import _LogprobRecorder, blocked_token_ids, completion_mask_from_eos, decode_completions
from lightning_r1v2.rollout.types import Rollouts
from lightning_r1v2.losses import entropy_from_logits, token_logprobs

FAST = os.environ.get("FAST", "ABCD")


def _groups_share_prompts(rows, G):
    n = len(rows)
    if n % G:
        return False
    p = rows.prompt_ids.view(n // G, G, -1)
    return bool((p == p[:, :1]).all())


class FastGRPO(GRPOModule):
    def sequence_logprobs(self, model, rows, with_entropy=False):
        G = self.hparams.group_size
        if "A" not in FAST or not _groups_share_prompts(rows, G):
            return super().sequence_logprobs(model, rows, with_entropy)
        pid, pm, pv = rows.prompt_ids[::G], rows.prompt_mask[::G], rows.pixel_values[::G]
        ppos = (pm.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=pid, attention_mask=pm, position_ids=ppos, pixel_values=pv.to(model.dtype),
                    use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(G)
        first = out.logits[:, -1:].repeat_interleave(G, 0)  # [n, 1, V] predicts completion token 0
        am = torch.cat([rows.prompt_mask, rows.completion_mask], 1)
        pos = (am.cumsum(-1) - 1).clamp(min=0)[:, pid.shape[1]:]
        out2 = model(input_ids=rows.completion_ids, attention_mask=am, position_ids=pos, past_key_values=cache, use_cache=False)
        logits = torch.cat([first, out2.logits[:, :-1]], 1) / self.engine.temperature
        block = torch.zeros(logits.shape[-1], dtype=torch.bool)
        block[blocked_token_ids(self.tokenizer)] = True
        logits = logits.masked_fill(block, float("-inf"))
        logp = token_logprobs(logits, rows.completion_ids).masked_fill(rows.completion_mask == 0, 0.0)
        ent = entropy_from_logits(logits.detach()) if with_entropy else None
        return logp, ent

    def log_dict(self, *args, **kwargs):
        if "C" in FAST:
            t = self.trainer
            if not t.loggers or (t.global_step + 1) % t.log_every_n_steps:
                return
        return super().log_dict(*args, **kwargs)

    def log(self, *args, **kwargs):
        if "C" in FAST:
            t = self.trainer
            if not t.loggers or (t.global_step + 1) % t.log_every_n_steps:
                return
        return super().log(*args, **kwargs)

    def configure_optimizers(self):
        cfg = super().configure_optimizers()
        if "D" in FAST:
            for g in cfg["optimizer"].param_groups:
                g["fused"] = True
                g["foreach"] = False
        return cfg


class FastEngine(HFGenerateEngine):
    @torch.no_grad()
    def generate(self, module, batch, group_size):
        if "B" not in FAST:
            return super().generate(module, batch, group_size)
        model, tok = module.model, module.tokenizer
        G = group_size
        input_ids = batch["input_ids"].repeat_interleave(G, dim=0)
        attention_mask = batch["attention_mask"].repeat_interleave(G, dim=0)
        pixel_values = batch["pixel_values"].repeat_interleave(G, dim=0)
        blocked = blocked_token_ids(tok)
        recorder = _LogprobRecorder(self.temperature, blocked) if self.record_logprobs else None
        was_training = model.training
        model.eval()
        pm = batch["attention_mask"]
        pos = (pm.cumsum(-1) - 1).clamp(min=0)
        pre = model(input_ids=batch["input_ids"][:, :-1], attention_mask=pm[:, :-1], position_ids=pos[:, :-1],
                    pixel_values=batch["pixel_values"].to(model.dtype), use_cache=True, logits_to_keep=1)
        cache = pre.past_key_values
        cache.batch_repeat_interleave(G)
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
            max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            logits_processor=LogitsProcessorList([recorder]) if recorder else None, suppress_tokens=blocked,
            **self.sampling_kwargs(),
        )
        model.train(was_training)
        P = input_ids.shape[1]
        completion_ids = out[:, P:]
        completion_mask, truncated = completion_mask_from_eos(completion_ids, tok.eos_token_id)
        old = recorder.finish(completion_ids[:, -1]).masked_fill(completion_mask == 0, 0.0) if recorder else None
        return Rollouts(
            prompt_ids=input_ids, prompt_mask=attention_mask, completion_ids=completion_ids,
            completion_mask=completion_mask, pixel_values=pixel_values,
            completions=decode_completions(tok, completion_ids, completion_mask),
            records=[r for r in batch["records"] for _ in range(G)],
            group_ids=torch.arange(len(batch["records"])).repeat_interleave(G), group_size=G,
            old_logprobs=old, truncated=truncated,
        )
