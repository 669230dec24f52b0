import pytest
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
    assert [m["pixel_values"].shape[0] for m in batch["media"]] == [1] * 4  # one tile per 32 px image
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


def test_stateful_sampler_shards_across_ranks_and_resumes_on_another_count():
    from lightning_r1v2.data.datamodule import StatefulRandomSampler

    order = list(iter(StatefulRandomSampler(11, seed=3)))  # one rank: the whole permutation
    ranks = [StatefulRandomSampler(11, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    assert [len(s) for s in ranks] == [5, 5]
    its = [iter(s) for s in ranks]
    got = [[next(it) for _ in range(2)] for it in its]  # two steps on each rank
    assert got == [[order[0], order[2]], [order[1], order[3]]]  # rank r takes rest[r::2]
    state = ranks[0].state_dict()
    assert state["consumed"] == 4  # the permutation's position, counted for both ranks
    # resumed on 3 ranks: the remaining 7 indices, 2 each (one dropped so that all ranks step alike)
    resumed = [StatefulRandomSampler(11, seed=3, num_replicas=3, rank=r) for r in range(3)]
    parts = []
    for s in resumed:
        s.load_state_dict(state)
        parts.append(list(iter(s)))
    assert parts == [[order[4], order[7]], [order[5], order[8]], [order[6], order[9]]]
    with pytest.raises(ValueError, match="rank 2"):
        StatefulRandomSampler(4, num_replicas=2, rank=2)


def test_lightning_does_not_wrap_the_sampler():
    """Lightning wraps samplers that are not DistributedSamplers; its wrapper breaks a resumed epoch."""
    from torch.utils.data import DistributedSampler

    from lightning_r1v2.data.datamodule import StatefulRandomSampler

    assert isinstance(StatefulRandomSampler(4), DistributedSampler)
