"""Mutation testing: put one small fault into the product, run the tests that should catch it, repeat.

    python tests/mutate.py               # every mutation (make mutate); about 6 minutes on a busy 2-core machine
    python tests/mutate.py -k buffer,mpo # only mutations whose file or name contains "buffer" or "mpo"
    python tests/mutate.py --list        # the mutations and the tests each one runs

Each mutation is (source file, exact original snippet, replacement, what the fault means). The
script copies the repository's package, tests, configs, notebooks, benchmarks, docs and top-level
files to a temporary folder once, and for each mutation writes the mutated file THERE, runs
the mapped tests against that copy (``PYTHONPATH`` points at the copy, so subprocesses import it
too), and writes the original back. The working tree is never changed. A mutation whose
snippet no longer occurs exactly once is reported as stale (the code moved; update its snippet),
not counted.

A mutant is killed when its tests fail (or run past ``--timeout``); it survives when they pass.
The score is killed / (killed + survived). Only the tests mapped to the mutated file run
(``TESTS`` below, or a mutation's own list), first failure stops the run (``-x``): the mapping
is what keeps a full run short on 2 cores; a survivor may therefore be caught by a test outside
its map, which ``--full-suite`` checks for the survivors (slow). Survivors, with the reason each
cannot matter or the test that now kills it, are listed in ``tests/README.md``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "lightning_r1v2/"


@dataclass
class Mutation:
    file: str  # relative to lightning_r1v2/
    edits: list[tuple[str, str]]  # (exact original snippet, replacement), each snippet unique in the file
    what: str
    tests: list[str] = field(default_factory=list)  # overrides TESTS[file] when given


def M(file, original, replacement, what, tests=None):
    return Mutation(file, [(original, replacement)], what, list(tests or []))


# source file -> the tests that exercise it (fast ones; the slow resume and DeepSpeed runs are left out)
TESTS = {
    "losses/grpo.py": ["tests/test_losses_grpo.py", "tests/test_grad_accumulation.py", "tests/test_grpo_step.py"],
    "losses/mpo.py": ["tests/test_losses_mpo.py", "tests/test_sft_mpo_step.py"],
    "losses/sft.py": ["tests/test_losses_sft.py", "tests/test_sft_mpo_step.py"],
    "losses/common.py": ["tests/test_losses_grpo.py", "tests/test_losses_sft.py", "tests/test_losses_mpo.py"],
    "modules/grpo.py": ["tests/test_grpo_step.py", "tests/test_grpo_module.py", "tests/test_grad_accumulation.py"],
    "modules/mpo.py": ["tests/test_sft_mpo_step.py", "tests/test_mpo_module.py"],
    "modules/sft.py": ["tests/test_sft_mpo_step.py"],
    "modules/common.py": ["tests/test_sft_mpo_step.py", "tests/test_rng_streams.py", "tests/test_evaluate_job.py",
                          "tests/test_grpo_step.py"],
    "callbacks/buffer.py": ["tests/test_buffer.py"],
    "callbacks/hallucination.py": ["tests/test_hallucination.py"],
    "rewards/rules.py": ["tests/test_rewards_rules.py", "tests/test_edge_tables.py"],
    "rewards/grounding.py": ["tests/test_rewards_rules.py", "tests/test_edge_tables.py"],
    "rewards/combine.py": ["tests/test_reward_callback.py"],
    "rewards/callback.py": ["tests/test_reward_callback.py", "tests/test_bad_inputs.py"],
    "rewards/reward_model.py": ["tests/test_reward_model.py"],
    "utils/checkpoint.py": ["tests/test_rng_streams.py", "tests/test_resume.py::test_atomic_io_keeps_the_old_file_when_a_write_fails",
                            "tests/test_resume.py::test_stale_partial_files_of_dead_processes_are_removed",
                            "tests/test_resume.py::test_partial_files_of_live_processes_are_kept"],
    "data/records.py": ["tests/test_records.py", "tests/test_bad_inputs.py", "tests/test_edge_tables.py"],
}

RNG2 = ["tests/test_rng_distributed.py"]  # two processes: ~20 s, only where a mutation concerns ranks

MUTATIONS = [
    # ---- the 18 survivors of issue 22 that its text names (the other 3 are not named there)
    M("modules/grpo.py", "self.manual_backward(loss * w)", "self.manual_backward(-loss * w)",
      "GRPO minimises the negative of its loss"),
    M("modules/sft.py", "        return loss\n", "        return -loss\n", "SFT minimises the negative of its loss"),
    M("modules/mpo.py", "        return loss\n", "        return -loss\n", "MPO minimises the negative of its loss"),
    M("modules/grpo.py", "kl_coef=hp.kl_coef, aggregation", "kl_coef=0.0, aggregation", "GRPO ignores kl_coef"),
    M("modules/grpo.py", "scale=hp.scale_advantages)", "scale=True)", "GRPO ignores scale_advantages=False"),
    M("modules/grpo.py", "old = rows.old_logprobs if rows.old_logprobs is not None else logp.detach()",
      "old = logp.detach()", "GRPO ignores the behaviour log-probs (ratio always 1, no clipping)"),
    M("modules/grpo.py", "mask_all = mask_all * (~rollouts.dropped).float()[:, None]", "mask_all = mask_all",
      "GRPO ignores the rows a reward fault dropped"),
    M("modules/grpo.py", "                    sched.step()\n", "                    pass\n", "the LR scheduler never steps"),
    Mutation("modules/mpo.py", [
        ("delta = self.delta.value  # read before this step's update (losses.mpo convention)",
         "delta = self.delta.update(self._gather(torch.cat(mpo_rewards(chosen.detach(), rejected.detach(), "
         "ref_chosen, ref_rejected, hp.beta))))"),
        ("        self.delta.update(self._gather(torch.cat([r_c, r_r])))\n", "")],
        "MPO updates delta before the loss reads it"),
    M("callbacks/buffer.py", "            self._load_local(parts[rank])\n", "            self._load_local(parts[0])\n",
      "every rank resumes rank 0's buffer", tests=["tests/test_buffer_distributed.py"]),
    M("callbacks/buffer.py", "new_idx = (effective & ~was_replayed)", "new_idx = (effective)",
      "the buffer stores replayed rows again"),
    M("callbacks/buffer.py", "not self._rank_seeded:\n            self.generator.manual_seed(self.seed + rank)",
      "not self._rank_seeded:\n            self.generator.manual_seed(self.seed)",
      "every rank draws the same buffer stream"),
    M("utils/checkpoint.py", "    random.setstate(_as_python_state(state[\"python\"]))\n", "",
      "Python's RNG not restored on resume"),
    M("utils/checkpoint.py", 'progress["is_last_batch"] = False', "pass",
      "the epoch fix for resuming at an epoch's last batch does nothing"),
    M("data/records.py", "    if not rec[\"question\"].strip():\n", "    if False:\n", "a record with an empty question is accepted"),
    M("data/records.py", 'if not isinstance(rec["answer"], (str, int, float)) or isinstance(rec["answer"], bool):',
      'if not isinstance(rec["answer"], (str, int, float)):', "a boolean answer is accepted"),
    M("callbacks/hallucination.py", "+ 1 if value > thr else 0", "+ 1 if value >= thr else 0",
      "the hallucination threshold is inclusive"),
    M("rewards/rules.py", "<= 1e-9 * max(1.0, abs(gn))", "<= 1e-2 * max(1.0, abs(gn))",
      "numeric answer tolerance loosened from 1e-9 to 1e-2"),
    M("rewards/rules.py", "    letter = _letter(g, with_text=False)\n", "    letter = _letter(g, with_text=True)\n",
      "a gold answer's text read as an option letter"),
    # ---- losses
    M("losses/grpo.py", "grouped.std(dim=1, keepdim=True)", "grouped.std(dim=1, keepdim=True, correction=0)",
      "group std biased (divisor G) instead of unbiased"),
    M("losses/grpo.py", "centred = grouped - grouped.mean(dim=1, keepdim=True)", "centred = grouped",
      "advantages not centred"),
    M("losses/grpo.py", "-torch.minimum(unclipped, clipped)", "-torch.maximum(unclipped, clipped)",
      "pessimistic min of the surrogate turned into max"),
    M("losses/grpo.py", "ratio.clamp(1.0 - clip_eps, 1.0 + high)", "ratio.clamp(1.0 - high, 1.0 + clip_eps)",
      "clip band's low and high widths swapped"),
    M("losses/grpo.py", "return torch.exp(d) - d - 1.0", "return torch.exp(d) - d", "k3 KL without its -1"),
    M("losses/grpo.py", "d = ref_logprobs - logprobs", "d = logprobs - ref_logprobs", "k3 KL of the wrong direction"),
    M("losses/grpo.py", "per_seq = masked_mean(per_token, mask, dim=-1)  # [N]\n        loss = masked_mean(per_seq, keep.any(dim=-1))",
      "per_seq = masked_mean(per_token, mask, dim=-1)  # [N]\n        loss = per_seq.mean()",
      "sequence mean counts rows without tokens"),
    M("losses/grpo.py", "log_ratio = torch.where(keep, logprobs - old_logprobs, 0.0)",
      "log_ratio = logprobs - old_logprobs", "log-ratio not zeroed at padding"),
    M("losses/grpo.py", "low_hit = (ratio < 1.0 - clip_eps) & (adv < 0)", "low_hit = (ratio < 1.0 - clip_eps)",
      "clip_ratio/low counts tokens the clip does not bind"),
    M("losses/grpo.py", "return [p / total if total > 0 else 0.0 for p in parts]", "return [1.0 / len(parts) for p in parts]",
      "micro-batches weighted equally"),
    M("losses/common.py", "parts.append(picked - torch.logsumexp(z, dim=-1))", "parts.append(picked - z.max(-1).values)",
      "log-softmax normaliser replaced by the max logit"),
    M("losses/common.py", "weighted = torch.where(probs > 0, probs * z, torch.zeros_like(z))", "weighted = probs * z",
      "entropy NaN on -inf logits"),
    M("losses/common.py", "return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), 0.0)",
      "return num / den", "masked mean NaN on an empty mask"),
    M("losses/common.py", "step = max(1, max_elements // per_row)", "step = max(1, max_elements // per_row) + 1",
      "chunks larger than the memory bound"),
    M("losses/mpo.py", "l_pref = -F.logsigmoid(r_c - r_r)", "l_pref = -F.logsigmoid(r_r - r_c)", "DPO prefers the rejected"),
    M("losses/mpo.py", "- F.logsigmoid(-(r_r - delta_t))", "- F.logsigmoid(r_r - delta_t)", "BCO pushes rejected up"),
    M("losses/mpo.py", "loss = (w_pref * l_pref + w_qual * l_qual + w_gen * l_gen).mean()",
      "loss = (w_pref * l_pref + w_qual * l_qual + w_qual * l_gen).mean()", "L_gen weighted by w_qual"),
    M("losses/mpo.py", "self.mean = self.momentum * self.mean + (1.0 - self.momentum) * total / n",
      "self.mean = (1.0 - self.momentum) * self.mean + self.momentum * total / n", "EMA weights swapped"),
    M("losses/mpo.py", "if self.momentum is None or self.count == 0:", "if self.momentum is None:",
      "EMA's first update does not set the mean"),
    M("losses/sft.py", "return logits[:, :-1], labels[:, 1:]", "return logits[:, 1:], labels[:, :-1]",
      "causal shift the wrong way"),
    M("losses/sft.py", "mask = labels != ignore_index  # [B, T]", "mask = labels != 0  # [B, T]",
      "SFT mask ignores ignore_index"),
    # ---- modules
    M("modules/grpo.py", "clip_eps=hp.clip_eps, clip_eps_high", "clip_eps=0.2, clip_eps_high", "GRPO ignores clip_eps"),
    M("modules/grpo.py", "aggregation=hp.aggregation,\n", "aggregation=\"sequence\",\n", "GRPO ignores aggregation"),
    M("modules/grpo.py", "                opt.zero_grad()\n", "                pass\n",
      "gradients accumulate across optimizer steps"),
    M("modules/grpo.py", "                if hp.max_grad_norm:\n", "                if False:\n", "gradient clipping never applied"),
    M("modules/grpo.py", "for pass_i in range(hp.updates_per_batch):", "for pass_i in range(1):", "updates_per_batch ignored"),
    M("modules/grpo.py", "single_pass = hp.updates_per_batch == 1 and mb >= n", "single_pass = True",
      "behaviour log-probs never recomputed before several passes"),
    M("modules/grpo.py", '"effective_share": (r.advantages.abs() > 1e-6).float().mean()',
      '"effective_share": (r.reward.abs() > 1e-6).float().mean()', "effective_share counts rewards, not advantages"),
    M("modules/grpo.py", "        if self.ref_model is not None and rollouts.ref_logprobs is None:\n",
      "        if False:\n", "reference log-probs never computed"),
    M("modules/mpo.py", "chosen_nll = -chosen / n_tok[:B].clamp(min=1)", "chosen_nll = -chosen",
      "L_gen a summed, not mean, token NLL"),
    M("modules/mpo.py", "beta=hp.beta, delta=delta", "beta=0.1, delta=delta", "MPO ignores beta"),
    M("modules/mpo.py", "weights=tuple(hp.weights),", "weights=(0.8, 0.2, 1.0),", "MPO ignores weights"),
    M("modules/mpo.py", "return ref[:B], ref[B:]", "return ref[B:], ref[:B]", "reference chosen/rejected swapped"),
    M("modules/mpo.py", "            self.ref_model.eval()  # the reference never trains, nor drops out\n",
      "            pass\n", "reference left in train mode"),
    M("modules/sft.py", 'shift_for_causal_lm(out.logits, batch["labels"])', 'shift_for_causal_lm(out.logits, batch["input_ids"])',
      "SFT trains on prompt and image tokens too"),
    M("modules/common.py", "return (step + 1) / warmup", "return step / warmup", "warmup starts at LR 0"),
    M("modules/common.py", "math.cos(math.pi * progress)", "math.cos(progress)", "cosine over a radian, not pi"),
    M("modules/common.py", "return floor + (1 - floor) * 0.5", "return (1 - floor) * 0.5", "cosine floor ignored"),
    M("modules/common.py", "warmup = int(self.hparams.warmup_ratio * total)", "warmup = 0", "warmup_ratio ignored"),
    M("modules/common.py", "decay = [p for p in params if param_ndim(p) >= 2]", "decay = [p for p in params if param_ndim(p) >= 1]",
      "weight decay on biases and norms"),
    M("modules/common.py", "            set_rng_state(state)\n", "            pass\n", "RNG state never restored"),
    M("modules/common.py", 'self.val_accuracy.update(torch.tensor(scores["accuracy"], device=self.device))',
      'self.val_accuracy.update(torch.tensor(scores["accuracy_letter_only"], device=self.device))',
      "val/accuracy is the letter-only score"),
    M("modules/common.py", "        text = text[: text.index(eos)]\n", "        pass\n",
      "evaluation scores text after the end-of-turn token"),
    M("modules/common.py", "            reopen_finished_epoch(checkpoint, type(dm).__qualname__)\n", "            pass\n",
      "the module never applies the epoch fix"),
    M("modules/common.py", "        save_rng_states(checkpoint)  # every rank's", "        pass  # every rank's",
      "checkpoints carry no RNG state"),
    M("modules/mpo.py", '        checkpoint["mpo_delta"] = self.delta.state_dict()\n', "", "MPO's delta not checkpointed"),
    M("modules/grpo.py", '        rollouts = call_rollout_hook(self.trainer, self, "on_advantages", rollouts)',
      '        call_rollout_hook(self.trainer, self, "on_advantages", rollouts)',
      "the batch a callback returns from on_advantages (the buffer's) is ignored"),
    # ---- the buffer
    M("callbacks/buffer.py", "n_replace = int(math.floor(self.refill_share * zero_idx.numel() + 0.5))",
      "n_replace = int(math.floor(self.refill_share * zero_idx.numel()))", "refill count rounded down"),
    M("callbacks/buffer.py", "young = (step - self._steps) <= self.max_age", "young = (step - self._steps) < self.max_age",
      "max_age off by one"),
    M("callbacks/buffer.py", "keep[zero_idx[zero_idx.numel() - n_replace :]] = False", "keep[zero_idx[:n_replace]] = False",
      "the first zero rows replaced, not the last"),
    M("callbacks/buffer.py", "replacement=n > drawable)", "replacement=True)", "always draws with replacement"),
    M("callbacks/buffer.py", "base = min(0, int(like.group_ids.min())) - 1", "base = -1",
      "replayed group ids may collide with the batch's negative ids"),
    M("callbacks/buffer.py", "w = (a / top).pow(alpha)", "w = a.pow(alpha)", "probabilities without the overflow guard"),
    M("callbacks/buffer.py", "self._keep(torch.arange(over, len(self._store)))", "self._keep(torch.arange(0, self.capacity))",
      "capacity evicts the newest"),
    M("callbacks/buffer.py", "        if self.clear_every_epoch:\n            self.clear()\n",
      "        if self.clear_every_epoch:\n            pass\n", "clear_every_epoch ignored"),
    M("callbacks/buffer.py", "            effective &= ~r.dropped.detach().cpu().bool()\n", "            pass\n",
      "dropped rows count as effective"),
    M("callbacks/buffer.py", '"generator": self.generator.get_state()}', '"generator": torch.Generator().get_state()}',
      "the buffer's generator not saved"),
    # ---- rewards
    M("rewards/rules.py", "    if not reasoning.strip():\n        return 0.0\n", "", "empty reasoning gets the format reward"),
    M("rewards/rules.py", "if text.count(_THINK_CLOSE) != 1:", "if text.count(_THINK_CLOSE) < 1:", "two </think> accepted"),
    M("rewards/rules.py", "start = matches[-1].end()", "start = matches[0].end()", "the first box is the answer"),
    M("rewards/rules.py", "    if _WORDS.match(p) or _WORDS.match(g):\n        return False\n", "",
      "words go to math-verify (accepts 'on' for 'no')"),
    M("rewards/rules.py", "            out.append(None)\n            continue\n        pred", "            out.append(0.0)\n            continue\n        pred",
      "no reference answer scores 0 instead of not applicable"),
    M("rewards/rules.py", "_choice_index(pred, opts, letters, by_text=choice_text)", "_choice_index(pred, opts, letters, by_text=True)",
      "choice_text=False ignored"),
    M("rewards/rules.py", "    s = _WS.sub(\" \", s).strip().lower()\n", "    s = _WS.sub(\" \", s).strip()\n", "answers case-sensitive"),
    M("rewards/grounding.py", "if complete else 0", "if False else 0", "grounding ignores missing colours"),
    M("rewards/grounding.py", "        if not claims:\n            out.append(0.0)", "        if not claims:\n            out.append(1.0)",
      "no claim scores full grounding"),
    M("rewards/combine.py", "total += float(weights.get(k, 1.0)) * torch.nan_to_num(cols[k], nan=0.0)",
      "total += torch.nan_to_num(cols[k], nan=0.0)", "weighted mode ignores weights"),
    M("rewards/combine.py", "            total += torch.nan_to_num(cols[k], nan=0.0)\n", "            total += cols[k]\n",
      "NaN (not applicable) leaks into the sum"),
    M("rewards/combine.py", "best = torch.where(stacked.isnan().all(0), torch.zeros_like(best), best)", "pass",
      "gate: a group where nothing applies gives -inf"),
    M("rewards/combine.py", "rollouts.dropped = drop if rollouts.dropped is None else rollouts.dropped | drop",
      "rollouts.dropped = drop", "a second reward's drops forget the first's"),
    M("rewards/callback.py", "if share > self.max_failure_share:", "if share >= self.max_failure_share:",
      "failure threshold inclusive"),
    M("rewards/callback.py", "            column[bad] = 0.0\n", "", "faulty rows keep NaN"),
    M("rewards/callback.py", "kwargs = {**copy.deepcopy(columns), **self.kwargs}", "kwargs = {**self.kwargs, **copy.deepcopy(columns)}",
      "columns win over the configured kwargs"),
    M("callbacks/hallucination.py", "if self.streaks[name] >= self.patience:", "if self.streaks[name] > self.patience:",
      "patience off by one"),
    M("rewards/reward_model.py", 'tok.truncation_side = "left"', 'tok.truncation_side = "right"',
      "a long text loses its answer, not its prompt's start"),
    M("rewards/reward_model.py", 'return [f"{p}\\n{c}" if p else str(c) for p, c in zip(prompts, completions)]',
      "return [str(c) for c in completions]", "the reward model never sees the prompt"),
    M("rewards/reward_model.py", 'prompts = kwargs.get("prompt") or kwargs.get("question")', 'prompts = kwargs.get("prompt")',
      "the records' question is not used as the prompt"),
    # ---- checkpoint and RNG
    M("utils/checkpoint.py", "    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))\n", "",
      "NumPy's RNG not restored"),
    M("utils/checkpoint.py", '    torch.set_rng_state(state["torch"])\n', "", "torch's RNG not restored"),
    M("utils/checkpoint.py", "    if len(parts) > 1:\n", "    if False:\n", "only rank 0's RNG state saved", tests=RNG2),
    M("utils/checkpoint.py", "            return parts[rank]\n", "            return parts[0]\n",
      "every rank resumes rank 0's RNG state", tests=RNG2),
    M("utils/checkpoint.py", "if pid == os.getpid() or _alive(pid):", "if pid == os.getpid():",
      "partial files of live processes deleted"),
    # ---- records
    M("data/records.py", 'if len(rec["question"]) > MAX_QUESTION_CHARS:', 'if len(rec["question"]) >= MAX_QUESTION_CHARS:',
      "question length limit off by one"),
    M("data/records.py", "            im.load()  # decodes every byte: catches truncated files that verify() misses\n",
      "            pass\n", "truncated images accepted"),
    M("data/records.py", "    if not str(rec[\"answer\"]).strip():\n", "    if False:\n", "empty answer accepted"),
    M("data/records.py", "        found = [p for p in IMAGE_PLACEHOLDERS if", "        found = [] and [p for p in IMAGE_PLACEHOLDERS if",
      "image placeholders in the text accepted"),
    M("data/records.py", 'if isinstance(rec["answer"], float) and not math.isfinite(rec["answer"]):', "if False:",
      "a NaN answer accepted"),
    M("data/records.py", 'rec["image"] = [str(root / p) for p in images]', 'rec["image"] = [str(p) for p in images]',
      "image paths not relative to the records file"),
]


def copy_tree(dst: Path) -> None:
    for name in ("lightning_r1v2", "tests", "configs", "notebooks", "benchmarks", "docs"):
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("cli.py", "pyproject.toml", "setup.cfg", "README.md", "Makefile"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dst / name)


PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "--no-header"]


def _verdict(rc: int, output: str, dt: float) -> tuple[str, float, str]:
    tail = output.strip().splitlines()[-1:] or [""]
    if rc == 0:
        return "survived", dt, tail[0]
    if rc in (1, 2):  # tests failed, or collection failed (e.g. the mutant does not import)
        return "killed", dt, tail[0]
    return "error", dt, output[-2000:]


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """``("killed" | "survived" | "timeout" | "error", seconds, tail of the output)``.

    pytest runs in a child forked from this process, which has imported torch, Lightning and
    transformers once (most of a small test run's time) but never ``lightning_r1v2``: the child
    imports the copy's. Tests' own subprocesses find the copy through ``PYTHONPATH``.
    """
    os.environ.update(PYTHONPATH=str(copy), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    log = copy / ".mutate-output.txt"
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child: its own process group, so a timeout also ends the tests' subprocesses
        rc = 3
        try:
            os.setpgid(0, 0)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(copy)
            sys.path.insert(0, str(copy))
            sys.dont_write_bytecode = True
            import pytest

            rc = int(pytest.main([*PYTEST_ARGS, *tests]))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() - t0 > timeout:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.perf_counter() - t0, ""
        time.sleep(0.1)
    rc = os.waitstatus_to_exitcode(status)
    return _verdict(rc, log.read_text(errors="replace"), time.perf_counter() - t0)


def preload() -> None:
    """Import what every test run imports, once, before forking (not lightning_r1v2 itself)."""
    import importlib

    for name in ("numpy", "PIL.Image", "torch", "torchmetrics", "lightning", "transformers",
                 "transformers.models.internvl", "transformers.models.qwen2"):
        importlib.import_module(name)
    import torch

    torch.set_num_threads(1)
    assert "lightning_r1v2" not in sys.modules


def apply(text: str, m: Mutation) -> str | None:
    for original, replacement in m.edits:
        if text.count(original) != 1:
            return None
        text = text.replace(original, replacement)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default="", help="only mutations whose file or description contains one of these "
                    "comma-separated words")
    ap.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant before it counts as killed")
    ap.add_argument("--full-suite", action="store_true", help="rerun each survivor against the whole default suite")
    args = ap.parse_args(argv)
    words = [w.strip().lower() for w in args.k.split(",")]
    todo = [m for m in MUTATIONS if any(w in (m.file + " " + m.what).lower() for w in words)]
    if not todo:
        print(f"no mutation matches {args.k!r}", file=sys.stderr)
        return 2
    if args.list:
        for i, m in enumerate(todo, 1):
            print(f"{i:3d}. {m.file}: {m.what}\n      tests: {' '.join(m.tests or TESTS[m.file])}")
        return 0
    results = {"killed": [], "survived": [], "stale": [], "timeout": [], "error": []}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="r1v2-mutate-") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        probe = subprocess.run([sys.executable, "-c", "import lightning_r1v2; print(lightning_r1v2.__file__)"],
                               cwd=copy, env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(copy)):
            print(f"the copy does not import its own package ({probe.stdout.strip()}): aborting", file=sys.stderr)
            return 2
        preload()
        baseline = sorted({t for m in todo for t in (m.tests or TESTS[m.file])})
        status, dt, tail = run_tests(copy, baseline, args.timeout * 4)
        print(f"baseline ({len(baseline)} test targets, unmutated): {status} in {dt:.0f}s: {tail}", flush=True)
        if status != "survived":
            print("the unmutated tests do not pass: fix that first", file=sys.stderr)
            return 2
        for i, m in enumerate(todo, 1):
            path = copy / PKG / m.file
            original = path.read_text()
            mutated = apply(original, m)
            if mutated is None:
                results["stale"].append((m, 0.0, "snippet not found exactly once"))
                print(f"[{i}/{len(todo)}] STALE    {m.file}: {m.what}", flush=True)
                continue
            path.write_text(mutated)
            try:
                status, dt, tail = run_tests(copy, m.tests or TESTS[m.file], args.timeout)
            finally:
                path.write_text(original)
            if status == "timeout":
                results["killed"].append((m, dt, "timeout"))
            results[status].append((m, dt, tail))
            print(f"[{i}/{len(todo)}] {status.upper():8s} {m.file}: {m.what} ({dt:.0f}s)", flush=True)
        survivors = [m for m, _, _ in results["survived"]]
        if args.full_suite and survivors:
            for m in survivors:
                path = copy / PKG / m.file
                original = path.read_text()
                path.write_text(apply(original, m))
                try:
                    status, dt, tail = run_tests(copy, ["tests"], args.timeout * 10)
                finally:
                    path.write_text(original)
                print(f"full suite on survivor {m.file}: {m.what}: {status} ({dt:.0f}s) {tail}", flush=True)
    killed, survived = len(results["killed"]), len(results["survived"])
    scored = killed + survived
    print(f"\nscore: {killed}/{scored} killed ({100 * killed / max(scored, 1):.1f}%), "
          f"{len(results['stale'])} stale, {len(results['error'])} errors, {time.perf_counter() - t_start:.0f}s")
    for m, _, _ in results["survived"]:
        print(f"SURVIVED  {m.file}: {m.what}")
    for m, _, why in results["stale"]:
        print(f"STALE     {m.file}: {m.what} ({why})")
    for m, _, out in results["error"]:
        print(f"ERROR     {m.file}: {m.what}\n{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
