"""The evaluate job's numbers, from crafted completions whose scores are known."""
from lightning_r1v2.data.records import read_records
from lightning_r1v2.jobs.evaluate import evaluate_module, majority_baseline
from lightning_r1v2.modules import SFTModule


def _reasoning(rec):
    counts = rec["annotations"]["counts"]
    return "<think> " + " ".join(f"{c} {n}" for c, n in counts.items()) + " </think> "


def test_evaluate_module_scores_crafted_completions(tiny_data):
    records, _ = read_records(tiny_data / "val.jsonl")
    m = SFTModule()
    texts = []
    for i, r in enumerate(records):
        if r.get("choices") and i % 2 == 0:  # the right option, boxed by its text instead of its letter
            gold = "ABCDEFGH".index(r["answer"])
            texts.append(_reasoning(r) + f"\\boxed{{{r['choices'][gold]}}}")
        elif i % 3 == 0:
            texts.append("\\boxed{nothing}")  # wrong, no reasoning block
        else:
            texts.append(_reasoning(r) + f"\\boxed{{{r['answer']}}}")
    it = iter(texts)  # evaluate_module generates batch by batch, in record order
    m.generate = lambda batch, max_new_tokens: [next(it) for _ in batch["records"]]
    out = evaluate_module(m, records, batch_size=5)
    n = len(records)
    text_boxed = sum(1 for i, r in enumerate(records) if r.get("choices") and i % 2 == 0)
    wrong = sum(1 for i, r in enumerate(records) if not (r.get("choices") and i % 2 == 0) and i % 3 == 0)
    assert text_boxed > 0 and wrong > 0
    assert out["n"] == n and out["completions"] == texts
    assert abs(out["accuracy"] - (n - wrong) / n) < 1e-9  # the option's text counts by default
    assert abs(out["accuracy_letter_only"] - (n - wrong - text_boxed) / n) < 1e-9
    assert abs(out["format"] - (n - wrong) / n) < 1e-9  # "\boxed{nothing}" has no <think> block
    assert out["hallucination"] == 0.0  # every stated count is the annotation's


def test_majority_baseline_by_hand():
    """Most common answer per question type in the reference: count -> "2" (2 of 3), colour -> "blue"
    (2 of 3). Eval: count 2 (hit), count 3 (miss), colour blue (hit), colour red (miss), a type the
    reference lacks (miss): 2 / 5."""
    ref = [{"type": "count", "answer": a} for a in ("2", "2", "3")] + [
        {"type": "colour", "answer": a} for a in ("red", "blue", "blue")]
    ev = [{"type": "count", "answer": "2"}, {"type": "count", "answer": "3"}, {"type": "colour", "answer": "blue"},
          {"type": "colour", "answer": "red"}, {"type": "compare", "answer": "yes"}]
    assert majority_baseline(ev, ref) == 2 / 5
    assert majority_baseline([{"answer": "a"}, {"answer": "b"}], [{"answer": "a"}] * 2 + [{"answer": "b"}]) == 1 / 2
    assert majority_baseline([], ref) == 0.0


def test_validation_logs_both_accuracies(tiny_data):
    """PolicyModule.validation_step scores like evaluate: option text counts in val/accuracy only."""
    records, _ = read_records(tiny_data / "val.jsonl")
    choice = [r for r in records if r.get("choices")][:2]
    assert len(choice) == 2
    m = SFTModule()
    gold = ["ABCDEFGH".index(r["answer"]) for r in choice]
    texts = [f"\\boxed{{{choice[0]['choices'][gold[0]]}}}", f"\\boxed{{{choice[1]['answer']}}}"]  # text, letter
    m.generate = lambda batch, max_new_tokens: texts
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, value)
    m.validation_step({"records": choice}, 0)
    assert float(logged["val/accuracy"].compute()) == 1.0
    assert float(logged["val/accuracy_letter_only"].compute()) == 0.5


def test_clean_completion_cuts_at_the_end_of_turn(processor):
    """What follows the first end-of-turn token (a second answer, padding) is not scored."""
    from lightning_r1v2.modules.common import clean_completion

    tok = processor.tokenizer
    text = f"<think> red 2 </think> \\boxed{{2}}{tok.eos_token} \\boxed{{3}}{tok.eos_token}{tok.pad_token}{tok.pad_token}"
    assert clean_completion(text, tok) == "<think> red 2 </think> \\boxed{2}"
    assert clean_completion(f"\\boxed{{2}}{tok.pad_token}", tok) == "\\boxed{2}"
