import torch

from lightning_r1v2.data.collate import IGNORE_INDEX, PromptCollator, SFTCollator
from lightning_r1v2.data.records import read_records


def test_sft_labels_only_on_response_tokens(tiny_data, processor):
    records, _ = read_records(tiny_data / "train.jsonl")
    batch = SFTCollator(processor)(records[:3])
    tok = processor.tokenizer
    for i, rec in enumerate(records[:3]):
        ids = batch["input_ids"][i]
        labels = batch["labels"][i]
        resp = tok(rec["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n_real = int(batch["attention_mask"][i].sum())
        # the response occupies exactly the last len(resp) real positions, and only they carry labels
        start = n_real - len(resp)
        assert ids[start:n_real].tolist() == resp
        assert labels[start:n_real].tolist() == resp
        assert (labels[:start] == IGNORE_INDEX).all() and (labels[n_real:] == IGNORE_INDEX).all()
        # prompt and image tokens are all before the response
        assert tok.context_image_token_id in ids[:start].tolist()
        assert (ids[n_real:] == tok.pad_token_id).all()  # right padding


def test_prompts_are_left_padded_with_records(tiny_data, processor):
    records, _ = read_records(tiny_data / "val.jsonl")
    batch = PromptCollator(processor)(records[:4])
    assert batch["records"] == records[:4]
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the edge
    last = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0, -2:].tolist())
    assert last == ["assistant", "\n"]
    assert batch["pixel_values"].shape[0] == 4
    ctx = processor.tokenizer.context_image_token_id
    assert ((batch["input_ids"] == ctx).sum(1) == 4).all()


def test_stateful_sampler_resumes_mid_epoch():
    from lightning_r1v2.data.datamodule import StatefulRandomSampler

    full = StatefulRandomSampler(10, seed=5)
    order = list(iter(full)) + list(iter(full))  # two epochs
    s = StatefulRandomSampler(10, seed=5)
    it = iter(s)
    first = [next(it) for _ in range(4)]
    state = s.state_dict()
    assert state["consumed"] == 4 and state["epoch"] == 0
    resumed = StatefulRandomSampler(10, seed=5)
    resumed.load_state_dict(state)
    rest = list(iter(resumed)) + list(iter(resumed))
    assert first + rest == order
    assert sorted(order[:10]) == list(range(10)) and order[:10] != order[10:]
    assert torch.is_tensor(torch.tensor(order))
