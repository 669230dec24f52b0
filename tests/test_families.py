"""Real VLM families end to end, on tiny random folders built in code (``tiny_families.py``).

Per family: the trainable parts select exactly their parameters; the HF engine's recorded
log-probs equal a fresh training forward (prompt sharing on and off); SFT and GRPO fit through the
CLI; and every other job (validate, build-pairs, MPO, prefilter, evaluate, export) in one chain. InternVL images are tiled (several tiles per image), and each rollout row
must carry exactly its own record's tiles, also after the Selective Sample Buffer mixed rows.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tiny_families import FAMILIES, build_family

ROOT = Path(__file__).resolve().parents[1]
G = 3


def length_reward(completions, **_):
    """A reward a random policy gets spread on (build-pairs needs pairs): longer is better."""
    return [min(len(c), 12) / 12 for c in completions]


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = build_family(name, tmp_path_factory.mktemp(f"fam_{name}"))
        return made[name]

    return get


@pytest.fixture(scope="session")
def fam_data(tmp_path_factory):
    from lightning_r1v2.data.synthetic import make_data

    out = tmp_path_factory.mktemp("fam_data")
    make_data(str(out), train=8, val=4, seed=5, difficulty="easy")
    return out


def _grpo(folder, share=True):
    from lightning_r1v2.modules.grpo import GRPOModule
    from lightning_r1v2.rollout.hf_engine import HFGenerateEngine

    m = GRPOModule(model=str(folder), group_size=G, share_prompt_forward=share,
                   engine=HFGenerateEngine(max_new_tokens=6, share_prompt_prefill=share))
    m.configure_model()
    return m


# the parts as a reader of each architecture would list them, written independently of families.py
def _expected_part(family: str, name: str) -> str:
    if family.startswith("qwen"):
        if ".visual.merger." in name or ".visual.deepstack_merger_list." in name:
            return "connector"
        return "vision" if name.startswith("model.visual.") else "llm"
    if "multi_modal_projector" in name:
        return "connector"
    return "vision" if "vision_tower" in name else "llm"


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_parts_select_exactly_their_parameters(family, family_dir):
    from lightning_r1v2.models.loading import load_policy, set_trainable

    model, _ = load_policy(str(family_dir(family)))
    names = [n for n, _ in model.named_parameters()]
    for part in ("vision", "connector", "llm"):
        set_trainable(model, [part])
        got = {n for n, p in model.named_parameters() if p.requires_grad}
        want = {n for n in names if _expected_part(family, n) == part}
        assert want and got == want, (part, sorted(got ^ want)[:5])


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_logprobs_equal_a_fresh_training_forward(family, family_dir, fam_data):
    from lightning_r1v2.data.collate import PromptCollator
    from lightning_r1v2.data.records import read_records

    records, _ = read_records(fam_data / "val.jsonl")
    paths = [p for r in records[2:4] for p in (r["image"] if isinstance(r["image"], list) else [r["image"]])]
    two_images = dict(records[2], image=paths, id="two")
    text_only = {k: v for k, v in records[1].items() if k != "image"}
    for share in (True, False):
        m = _grpo(family_dir(family), share)
        batch = PromptCollator(m.processor)([records[0], two_images, text_only])
        n_img = [len(m["image_grid_thw"]) if "image_grid_thw" in m else len(m.get("pixel_values", [])) for m in batch["media"]]
        assert n_img[2] == 0 and n_img[1] > n_img[0] > 0  # each record its own images (InternVL: tiles)
        torch.manual_seed(0)
        r = m.engine.generate(m, batch, G)
        m.model.eval()
        with torch.no_grad():
            logp, _ = m.sequence_logprobs(m.model, r)
        mask = r.completion_mask.bool()
        gap = (logp - r.old_logprobs)[mask].abs().mean().item()
        assert mask.sum() > 0 and gap < 1e-4, (family, share, gap)


def test_internvl_rows_carry_their_own_tiles_after_the_buffer(family_dir, tmp_path):
    """Wide images give several tiles; rows mixed by the buffer across batches keep their own."""
    from lightning_r1v2.callbacks.buffer import SelectiveSampleBuffer
    from lightning_r1v2.data.collate import PromptCollator
    from lightning_r1v2.rollout.types import Rollouts

    m = _grpo(family_dir("internvl"))
    proc = m.processor
    records = []
    for i, (w, h) in enumerate([(64, 16), (16, 48), (48, 32), (16, 16)]):
        path = tmp_path / f"{i}.png"
        img = Image.new("RGB", (w, h), (40 * i, 255 - 40 * i, 7 * i))
        img.putpixel((i, 0), (255, 255, 255))
        img.save(path)
        records.append({"id": f"r{i}", "image": str(path), "question": "How many?", "answer": "1"})
    want = {r["id"]: proc.image_processor(images=[Image.open(r["image"]).convert("RGB")], return_tensors="pt")["pixel_values"]
            for r in records}
    assert len({v.shape[0] for v in want.values()}) >= 3 and max(v.shape[0] for v in want.values()) > 1  # tiles differ
    buf = SelectiveSampleBuffer(capacity=64, refill_share=1.0)
    seen = []
    for step, recs in enumerate([records[:2], records[2:], records[:1] + records[3:]]):
        r = m.engine.generate(m, PromptCollator(proc)(recs), G)
        # two groups: the first effective, the second zero-variance (refilled from the buffer)
        r.reward = torch.tensor([1.0, 0.0, 0.5] + [0.0] * G)
        r.advantages = torch.tensor([1.0, -1.0, 0.0] + [0.0] * G)
        r = buf.on_advantages(None, m, r) or r
        seen.append(r)
    mixed = Rollouts.concat(seen, pad_token_id=proc.tokenizer.pad_token_id)
    assert mixed.from_buffer.any()
    for rec, media in zip(mixed.records, mixed.media):
        assert torch.equal(media["pixel_values"], want[rec["id"]]), rec["id"]
    with torch.no_grad():  # and the model accepts every row as it is
        logp, _ = m.sequence_logprobs(m.model, mixed)
    assert torch.isfinite(logp[mixed.completion_mask.bool()]).all()


def test_placeholder_typed_in_the_question_is_a_clear_error(family_dir, fam_data):
    from lightning_r1v2.data.collate import PromptCollator
    from lightning_r1v2.data.records import read_records
    from lightning_r1v2.models.loading import load_policy_processor

    proc = load_policy_processor(str(family_dir("llava")))
    records, _ = read_records(fam_data / "val.jsonl")
    bad = dict(records[0], question="Look at <image> and count.")
    with pytest.raises(ValueError, match=r"val\.jsonl:1: the prompt holds 2 image placeholder\(s\) '<image>' but the record has 1"):
        PromptCollator(proc)([bad])
    text_only = {k: v for k, v in records[0].items() if k != "image"}  # text-only records are fine
    batch = PromptCollator(proc)([text_only, records[1]])
    assert batch["media"][0] == {} and batch["media"][1]["pixel_values"].shape[0] == 1


# ------------------------------------------------------------------------------------- the CLI
def _main(*args):
    sys.path.insert(0, str(ROOT))
    from cli import main

    return main(list(args))


def _common(folder, data, run, kind):
    return ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "2",
            "--trainer.default_root_dir", str(run),
            "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false",
            "--model.model", str(folder), "--model.eval_max_new_tokens", "4",
            "--data.train_file", str(data / "train.jsonl"), "--data.val_file", str(data / "val.jsonl"),
            "--data.batch_size", "2"]


def _config(stage, run, data):
    """The shipped config of ``stage``, writing under ``run`` and reading ``data``."""
    import re

    text = re.sub(r"runs/\w+", str(run), (ROOT / f"configs/tiny/{stage}.yaml").read_text())
    path = Path(str(run) + f"-{stage}.yaml")
    path.write_text(text.replace("data/tiny/", f"{data}/"))
    return str(path)


def _sft(folder, data, run):
    return _main("fit", "--config", _config("sft", run, data), *_common(folder, data, run, "sft"))


def _grpo_fit(folder, data, run, init):
    return _main("fit", "--config", _config("grpo", run, data), *_common(folder, data, run, "grpo"),
                 "--model.init_ckpt", str(init), "--model.group_size", "3", "--model.engine.init_args.max_new_tokens", "6",
                 "--model.table_every_n_steps", "1", "--trainer.val_check_interval", "null",
                 "--trainer.check_val_every_n_epoch", "1")


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_then_grpo_fit_through_the_cli(family, family_dir, fam_data, tmp_path):
    folder = family_dir(family)
    cli = _sft(folder, fam_data, tmp_path / "sft")
    assert cli.trainer.global_step == 2
    ckpt = tmp_path / "sft" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    cli = _grpo_fit(folder, fam_data, tmp_path / "grpo", ckpt)
    m = cli.model
    assert cli.trainer.global_step == 2  # one rollout batch, 2 updates on it (the shipped config)
    r = m.last_rollouts
    assert r is not None and len(r) > 0 and all(rec["id"] for rec in r.records)
    for cb in cli.trainer.callbacks:  # buffer and monitors ran
        if type(cb).__name__ == "SelectiveSampleBuffer":
            assert cb._calls > 0
        if type(cb).__name__ == "HallucinationMonitor":
            assert cb.last_stats


@pytest.mark.parametrize("family", FAMILIES)
def test_every_job_on_the_family(family, family_dir, fam_data, tmp_path):
    folder = family_dir(family)
    _sft(folder, fam_data, tmp_path / "sft")
    ckpt = tmp_path / "sft" / "checkpoints" / "last.ckpt"
    val = _main("validate", "--config", _config("sft", tmp_path / "v", fam_data), *_common(folder, fam_data, tmp_path / "v", "sft"),
                "--ckpt_path", str(ckpt))
    assert "val/accuracy" in val.trainer.callback_metrics
    pairs = tmp_path / "pairs.jsonl"
    _main("build-pairs", "--ckpt_path", str(ckpt), "--data", str(fam_data / "train.jsonl"), "--out", str(pairs),
          "--num_samples", "4", "--max_new_tokens", "8", "--threshold", "0.1", "--batch_size", "4",
          "--rewards", json.dumps([{"class_path": "lightning_r1v2.rewards.RewardCallback",
                                    "init_args": {"fn": "test_families.length_reward", "name": "accuracy"}}]))
    assert pairs.exists() and pairs.read_text().strip()
    mpo = _main("fit", "--config", _config("mpo", tmp_path / "mpo", fam_data),
                *_common(folder, fam_data, tmp_path / "mpo", "mpo"), "--data.train_file", str(pairs),
                "--model.init_ckpt", str(ckpt))
    assert mpo.trainer.global_step >= 1
    out = tmp_path / "pre.jsonl"
    _main("prefilter", "--ckpt_path", str(ckpt), "--data", str(fam_data / "train.jsonl"), "--out", str(out), "--k", "2",
          "--max_new_tokens", "4", "--batch_size", "4")
    assert out.exists()
    report = _main("evaluate", "--ckpt_path", str(ckpt), "--data", str(fam_data / "val.jsonl"), "--max_new_tokens", "4")
    assert report is not None
    hf = tmp_path / "hf"
    _main("export", "--ckpt_path", str(ckpt), "--out", str(hf))
    cfg = json.loads((hf / "config.json").read_text())
    src = json.loads((folder / "config.json").read_text())
    proc_cls = json.loads((hf / "processor_config.json").read_text()).get("processor_class")
    assert cfg["model_type"] == src["model_type"] and cfg["architectures"] == src["architectures"]
    assert proc_cls == json.loads((folder / "processor_config.json").read_text())["processor_class"]
