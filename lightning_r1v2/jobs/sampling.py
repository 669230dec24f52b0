"""What the offline sampling jobs (``build-pairs``, ``prefilter``) share.

Load a policy, sample ``N`` completions for every record with ``HFGenerateEngine``, score them
with ``RewardCallback``s (the same YAML list GRPO configs use) and combine the columns with
``combine_rewards``. One ``SampledGroup`` per record comes out, in record order.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

log = logging.getLogger("lightning_r1v2.jobs")

DEFAULT_REWARDS: list[dict] = [
    # R1V3's hybrid reward (0.8 accuracy + 0.2 format), as configs/tiny/build_pairs.yaml; the GRPO config adds grounding
    {"class_path": "lightning_r1v2.rewards.RewardCallback",
     "init_args": {"fn": "lightning_r1v2.rewards.accuracy_reward", "name": "accuracy", "weight": 0.8}},
    {"class_path": "lightning_r1v2.rewards.RewardCallback",
     "init_args": {"fn": "lightning_r1v2.rewards.format_reward", "name": "format", "weight": 0.2}},
]

# Fields ``read_records`` adds; they are not written back.
_INTERNAL = ("image_rel", "_source", "_line")


@dataclass
class SampledGroup:
    """The ``N`` scored samples of one record."""

    record: dict
    completions: list[str]  # [N] decoded text without EOS and padding, reasoning tags kept
    rewards: dict[str, list[float]] = field(default_factory=dict)  # reward name -> [N] (NaN: n/a)
    reward: list[float] = field(default_factory=list)  # [N] combined
    truncated: list[bool] = field(default_factory=list)  # [N] hit max_new_tokens


def load_policy_module(policy: str, map_location: str = "cpu"):
    """A ``PolicyModule`` from a Lightning checkpoint (``.ckpt`` file or DeepSpeed folder), ``tiny`` or a HF folder."""
    from ..modules.common import PolicyModule
    from .export import is_deepspeed_checkpoint, load_module

    if Path(policy).is_file() or is_deepspeed_checkpoint(policy):
        module = load_module(policy, map_location=map_location)
    elif policy == "tiny" or Path(policy).is_dir():
        module = PolicyModule(model=policy, defer_init=False)  # no Trainer will call configure_model
    else:
        raise FileNotFoundError(f"{policy!r}: not a checkpoint file, a model folder or 'tiny'")
    return module.eval().requires_grad_(False)


def build_reward_callbacks(specs: list[dict] | None) -> list:
    """``RewardCallback``s (or any object with ``score``/``name``/``weight``) from YAML-style dicts.

    Each spec is ``{class_path: ..., init_args: {...}}``, the form of a trainer callback in a config.
    """
    from ..callbacks.hooks import is_reward_callback
    from ..rewards.callback import import_object

    specs = DEFAULT_REWARDS if specs is None else specs
    if not specs:
        raise ValueError("no reward callbacks given")
    out = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or "class_path" not in spec:
            raise ValueError(f"rewards[{i}] must be a dict with a 'class_path', got {spec!r}")
        cls = import_object(spec["class_path"])
        cb = cls(**dict(spec.get("init_args") or {}))
        if not is_reward_callback(cb):
            raise TypeError(f"rewards[{i}] ({spec['class_path']}) has no score/name/weight")
        out.append(cb)
    names = [cb.name for cb in out]
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be distinct, got {names}")
    return out


def load_records(data: str, limit: int = 0, strict: bool = True, format: str = "auto",
                 columns: dict | None = None, check_images: bool = True) -> list[dict]:
    """Validated records of any source ``read_source`` reads (a JSONL file, a ``save_to_disk``
    folder, parquet/arrow files, LLaVA JSON), the first ``limit`` if > 0. Image paths are absolute;
    embedded images are references (``sources.open_image``)."""
    from ..data.sources import check_source_args, read_source

    check_source_args(format, columns)
    records, _ = read_source(data, format=format, columns=columns, strict=strict, check_images=check_images)
    return records[:limit] if limit else records


_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif"}  # PIL format -> file extension, where not its lower case


class EmbeddedImages:
    """Writes the embedded images of output records as files in ``folder`` (under ``out_dir``), each once.

    A reference ``{"dataset": "parquet:/abs/train.parquet", "row": 12, "column": "images", "index": 0}``
    becomes ``<folder>/train-12_0.png`` (``train-12.png`` when ``index`` is None), the extension from
    the image's format; the record gets that path relative to ``out_dir``.
    """

    def __init__(self, out_dir: str | Path, folder: str | Path):
        self.out_dir = Path(out_dir)
        self.folder = Path(folder)
        self.written: dict[tuple, str] = {}  # reference key -> path relative to out_dir
        self._names: dict[str, tuple] = {}  # file stem -> the reference it holds

    @classmethod
    def beside(cls, out: str | Path) -> "EmbeddedImages":
        """For an output file ``out``: images in ``<out's folder>/<out's stem>.images/``."""
        out = Path(out)
        return cls(out.parent, out.parent / f"{out.stem}.images")

    def _stem(self, ref: dict, key: tuple) -> str:
        where = str(ref["dataset"]).partition(":")[2]
        stem = f"{Path(where).stem}-{int(ref['row'])}"
        if ref.get("index") is not None:
            stem += f"_{int(ref['index'])}"
        if self._names.setdefault(stem, key) != key:  # two shards with one file stem: tell them apart
            stem += "-" + hashlib.sha1(str(ref["dataset"]).encode()).hexdigest()[:8]
            self._names[stem] = key
        return stem

    def path(self, ref: dict) -> str:
        """The file of ``ref`` (written now if new), relative to ``out_dir``, with ``/`` separators."""
        from PIL import Image, UnidentifiedImageError

        from ..data.sources import image_bytes

        key = (ref["dataset"], ref["column"], int(ref["row"]), ref.get("index"))
        if key not in self.written:
            blob = image_bytes(ref)
            try:
                with Image.open(io.BytesIO(blob)) as im:
                    fmt = im.format
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"embedded image {ref} cannot be decoded ({type(e).__name__}: {e})") from None
            ext = _EXTENSIONS.get(fmt or "", (fmt or "bin").lower())
            target = self.folder / f"{self._stem(ref, key)}.{ext}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob)
            self.written[key] = Path(os.path.relpath(target, self.out_dir)).as_posix()
        return self.written[key]


def output_record(rec: dict, out_dir: str | Path, embedded: EmbeddedImages | None = None) -> dict:
    """``rec`` ready to write into ``out_dir``: no internal keys, image paths relative to that folder
    when the images lie under it (so data and images move together), else absolute. Embedded images
    (references into a dataset) are written as files by ``embedded`` and get their relative path."""
    if rec.get("image") is None:  # a text-only record
        return {k: v for k, v in rec.items() if k not in _INTERNAL}
    from ..data.sources import is_embedded

    images = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
    rel = []
    for p in images:
        if is_embedded(p):
            if embedded is None:
                raise ValueError(f"{rec.get('_source', rec.get('id'))}: an embedded image needs a place to be "
                                 "written (output_record's embedded=EmbeddedImages(...))")
            rel.append(embedded.path(p))
            continue
        r = os.path.relpath(os.path.abspath(p), os.path.abspath(out_dir))
        rel.append(os.path.abspath(p) if r.startswith("..") else r)
    out = {k: v for k, v in rec.items() if k not in _INTERNAL}
    was_list = isinstance(rec.get("image_rel", rec["image"]), list)
    out["image"] = rel if was_list else rel[0]
    return out


class Progress:
    """Prints ``done/total``, the rate and the time left every ``every`` batches (and at the end)."""

    def __init__(self, name: str, total: int, every: int = 5):
        self.name, self.total, self.every = name, total, max(1, every)
        self.t0 = time.perf_counter()
        self.batches = 0

    def update(self, done: int) -> None:
        self.batches += 1
        if self.batches % self.every and done < self.total:
            return
        dt = time.perf_counter() - self.t0
        rate = done / max(dt, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        print(f"{self.name}: {done}/{self.total} prompts, {rate:.1f} prompts/s, {dt:.0f}s elapsed, ~{eta:.0f}s left",
              flush=True)


def sample_groups(
    module,
    records: list[dict],
    num_samples: int,
    callbacks: list,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 24,
    reward_mode: str = "weighted",
    batch_size: int = 32,
    seed: int = 0,
    progress: str | None = "sampling",
    progress_every: int = 5,
) -> Iterator[SampledGroup]:
    """Sample ``num_samples`` completions per record and score them; yields one group per record.

    Args:
        module: a ``PolicyModule`` (``load_policy_module``).
        records: records from ``load_records`` (absolute image paths or embedded references).
        callbacks: reward callbacks (``build_reward_callbacks``), scored in this order.
        reward_mode: how ``combine_rewards`` combines the columns (``weighted``, ``sum``, ``gate``).
        batch_size: prompts per ``generate`` call (``batch_size * num_samples`` sequences).
        seed: seeds the sampling; the same seed and batch size give the same samples.
        progress: a name to print progress under; None prints nothing.
    """
    from ..data.collate import PromptCollator
    from ..rewards.combine import score_and_combine
    from ..rollout.hf_engine import HFGenerateEngine

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    engine = HFGenerateEngine(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              record_logprobs=False)
    collate = PromptCollator(module.processor)
    torch.manual_seed(seed)
    bar = Progress(progress, len(records), progress_every) if progress else None
    G = num_samples
    for start in range(0, len(records), batch_size):
        recs = records[start : start + batch_size]
        rollouts = engine.generate(module.policy(), collate(recs), G)  # completions keep <think>, drop EOS and padding
        reward = score_and_combine(rollouts, callbacks, reward_mode)  # [B*G]
        truncated = rollouts.truncated.tolist()
        for b, rec in enumerate(recs):
            sl = slice(b * G, (b + 1) * G)
            yield SampledGroup(
                record=rec,
                completions=rollouts.completions[sl],
                rewards={k: v[sl].tolist() for k, v in rollouts.rewards.items()},
                reward=reward[sl].tolist(),
                truncated=truncated[sl],
            )
        if bar:
            bar.update(start + len(recs))


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_report(path: str | Path, report: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def default_report_path(out: str | Path) -> Path:
    """``data/tiny/pairs.jsonl`` -> ``data/tiny/pairs.report.json``."""
    out = Path(out)
    return out.with_name(out.stem + ".report.json")
