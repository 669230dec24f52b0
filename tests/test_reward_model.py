"""RewardModelScorer: a tiny saved reward model loads offline and scores in batches like one at a time."""
import pytest
import torch
from torch import nn

from lightning_r1v2.rewards import RewardCallback, RewardModelScorer, build_tiny_reward_model
from lightning_r1v2.rollout.types import Rollouts

COMPLETIONS = [
    "<think> red 2 green 0 blue 3 yellow 1 </think> \\boxed{2}",
    "\\boxed{blue}",
    "<think> I see so many shapes </think> \\boxed{yes}",
    "x",
    "<think> Wait, let check the count again, red 1 </think> the answer is \\boxed{B}",
]
PROMPTS = ["How many red shapes are there?"] * 3 + ["Which colour is most frequent?"] * 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_reward_model(tmp_path_factory.mktemp("rm"))


def test_batched_equals_one_at_a_time_and_is_deterministic(model_dir):
    scorer = RewardModelScorer(model_dir)
    batched = scorer(COMPLETIONS, prompts=PROMPTS, batch_size=2)
    single = [scorer([c], prompts=[p])[0] for c, p in zip(COMPLETIONS, PROMPTS)]
    assert len(batched) == 5 and all(isinstance(s, float) for s in batched)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), rtol=0, atol=1e-5)
    assert RewardModelScorer(model_dir)(COMPLETIONS, prompts=PROMPTS, batch_size=3) == pytest.approx(batched, abs=1e-6)
    assert len(set(round(s, 6) for s in batched)) > 1  # the text matters


def test_prompt_is_part_of_the_scored_text(model_dir):
    scorer = RewardModelScorer(model_dir)
    assert scorer.texts(["b"], ["a"]) == ["a\nb"]
    with_prompt = scorer(COMPLETIONS[:1], prompts=PROMPTS[:1])
    # the records' question column stands in for prompts
    assert scorer(COMPLETIONS[:1], question=PROMPTS[:1]) == with_prompt
    assert scorer(COMPLETIONS[:1]) != with_prompt


def test_as_reward_callback(model_dir):
    scorer = RewardModelScorer(model_dir)
    n = len(COMPLETIONS)
    ro = Rollouts(
        prompt_ids=torch.zeros(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=torch.zeros(n, 1, dtype=torch.long),
        completion_mask=torch.ones(n, 1, dtype=torch.long),
        media=[{}] * n,
        completions=COMPLETIONS,
        records=[{"id": i, "question": p, "answer": "2"} for i, p in enumerate(PROMPTS)],
        group_ids=torch.arange(n),
        group_size=1,
    )
    cb = RewardCallback(fn=scorer, kwargs={"batch_size": 2})
    assert cb.name == "reward_model"
    col = cb.score(ro)
    torch.testing.assert_close(col, torch.tensor(scorer(COMPLETIONS, prompts=PROMPTS)), rtol=0, atol=1e-5)


class ScalarHead(nn.Module):
    """A stand-in VLM reward model: returns [B] scores directly (no .logits)."""

    def forward(self, input_ids, attention_mask):
        return (input_ids * attention_mask).sum(-1).float()


def test_any_module_with_scalar_output(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    scorer = RewardModelScorer(model=ScalarHead(), tokenizer=tok)
    scores = scorer(["a", "bb"], batch_size=2)
    ids = [tok("a")["input_ids"], tok("bb")["input_ids"]]
    assert scores == [float(sum(i)) for i in ids]


def test_a_long_text_is_cut_from_the_left_so_the_answer_is_scored(model_dir):
    """max_length cuts the prompt's start, never the completion's end: two completions that differ
    only in their final answer score differently even when the text is longer than max_length."""
    scorer = RewardModelScorer(model_dir, max_length=8)
    prompt = "How many red shapes are there? " * 10
    a, b = scorer(["<think> red 2 </think> \\boxed{2}", "<think> red 2 </think> \\boxed{3}"], prompts=[prompt] * 2)
    assert a != b
