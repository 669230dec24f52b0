import torch
from PIL import Image

from lightning_r1v2.models.loading import load_policy, set_trainable
from lightning_r1v2.models.tiny import IMG_CONTEXT, THINK_END, THINK_START, build_tiny_model


def _batch(processor, n=2):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red shapes are there?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    imgs = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))][:n]
    return processor(images=imgs, text=[text] * n, return_tensors="pt", padding=True)


def test_tokenizer_round_trips_and_has_special_tokens(processor):
    tok = processor.tokenizer
    text = "<think> red 2 green 0 blue 3 </think> \\boxed{\\frac{1}{2}} x=3, (B)."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # known words are single tokens, with their leading space
    assert tok.convert_ids_to_tokens(tok(" red", add_special_tokens=False)["input_ids"]) == [" red"]
    for t in (THINK_START, THINK_END, IMG_CONTEXT):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    assert tok.start_image_token == "<img>" and tok.context_image_token == IMG_CONTEXT
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id


def test_processor_expands_image_placeholder(processor):
    b = _batch(processor)
    ctx = processor.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    assert (b["input_ids"] == ctx).sum(dim=1).tolist() == [4, 4]  # 32px / 8px patches / pixel shuffle 0.5 = 2x2
    assert b["pixel_values"].shape == (2, 3, 32, 32)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\n<IMG_CONTEXT>\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_model_is_internvl_and_small(processor):
    model = build_tiny_model(tokenizer=processor.tokenizer)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    n = sum(p.numel() for p in model.parameters())
    assert 300_000 < n < 5_000_000
    out = model(**_batch(processor))
    assert out.logits.shape[-1] == len(processor.tokenizer)


def test_save_and_load_round_trip_gives_same_greedy_output(tmp_path, processor):
    model, proc = load_policy("tiny", seed=3)
    b = _batch(proc)
    ref = model.generate(**b, max_new_tokens=8, do_sample=False)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    model2, proc2 = load_policy(str(tmp_path))  # the same code path as a real checkpoint folder
    assert type(proc2).__name__ == "TinyVLProcessor"
    b2 = _batch(proc2)
    assert torch.equal(b["input_ids"], b2["input_ids"])
    assert torch.equal(ref, model2.generate(**b2, max_new_tokens=8, do_sample=False))


def test_load_policy_rejects_missing_folder():
    import pytest

    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_policy("/no/such/folder")


def test_trainable_parts_freeze_the_rest(processor):
    model = build_tiny_model(tokenizer=processor.tokenizer)
    counts = set_trainable(model, ["connector"])
    assert counts["trainable"] == counts["params/connector"]
    assert counts["trainable"] + counts["frozen"] == sum(p.numel() for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    b = _batch(processor)
    loss = model(**b).logits.float().pow(2).mean()
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("multi_modal_projector" in n for n in changed)
    assert any("multi_modal_projector" in n for n in changed)
    import pytest

    with pytest.raises(ValueError, match="subset"):
        set_trainable(model, ["decoder"])


def test_connector_and_llm_setting(processor):
    model = build_tiny_model(tokenizer=processor.tokenizer)
    counts = set_trainable(model, ["connector", "llm"])
    assert counts["frozen"] == counts["params/vision"]
    vision = [p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n]
    assert vision and not any(vision)


def test_building_the_tiny_model_leaves_the_global_rng_alone(processor):
    # the init seed fixes the weights, but must not reset the run's RNG (seed_everything would be void)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(tokenizer=processor.tokenizer, seed=0)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(999)
    b = build_tiny_model(tokenizer=processor.tokenizer, seed=0)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n  # same init seed -> same weights, whatever the global RNG
