import os
import sys

# Tiny models on a shared 2-core machine run several times faster on one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small synthetic data set (images + JSONL), made once per test session."""
    from lightning_r1v2.data.synthetic import make_data

    out = tmp_path_factory.mktemp("tiny_data")
    make_data(str(out), train=64, val=16, seed=123, difficulty="easy")
    return out


@pytest.fixture(scope="session")
def processor():
    from lightning_r1v2.models.tiny import build_processor

    return build_processor()


def _make_eos_likely(module, records, logit: float = 4.0) -> None:
    """Set the policy's EOS output row so that EOS gets a logit of about ``logit`` after these prompts.

    The random tiny policy almost never samples EOS in a few tokens (1 of 301 tokens), so its
    completions are all max_new_tokens long; tests of the EOS mask or of length-weighted means
    need completions that end early. The row becomes ``logit * h / |h|^2``, h the mean input of
    ``lm_head`` over the prompts' tokens (the embeddings are tied, so EOS's input embedding changes too).
    """
    from lightning_r1v2.data.collate import PromptCollator

    batch = PromptCollator(module.processor)(records)
    seen = []
    hook = module.model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    try:
        with torch.no_grad():
            module.model(**module.model_inputs(batch))
    finally:
        hook.remove()
    h = seen[0][batch["attention_mask"].bool()].mean(0)  # [D]
    with torch.no_grad():
        module.model.lm_head.weight[module.tokenizer.eos_token_id] = logit * h / h.norm() ** 2


@pytest.fixture(scope="session")
def make_eos_likely():
    """``make_eos_likely(module, records, logit=4.0)``: see ``_make_eos_likely``."""
    return _make_eos_likely


@pytest.fixture(scope="session")
def pairs_file(tiny_data):
    """8 pairs: the reference response vs. a wrong answer of a different length."""
    import json

    from lightning_r1v2.data.records import read_records

    records, _ = read_records(tiny_data / "train.jsonl")
    path = tiny_data / "mpo_pairs.jsonl"
    with path.open("w") as f:
        for i, rec in enumerate(records[:8]):
            row = {k: rec[k] for k in ("id", "question", "answer")}
            row.update(image=rec["image_rel"], pair_id=f"{rec['id']}/0", chosen=rec["response"],
                       rejected="<think> red " + "9 " * (i % 3) + "</think> \\boxed{9}")
            f.write(json.dumps(row) + "\n")
    return path
