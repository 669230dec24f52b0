"""DataModules: records from JSONL, Hugging Face datasets, parquet/arrow or LLaVA JSON
(``sources.py``), validated, length-filtered and batched.

The processor comes from the LightningModule (``trainer.lightning_module.processor``), so data
and model always agree on the tokenizer and the number of image tokens.

The training sampler is stateful (``state_dict`` / ``load_state_dict``): Lightning saves its
position with the checkpoint, so a resumed run continues the epoch where it stopped instead of
replaying it (EasyR1 issue 57).
"""
from __future__ import annotations

import logging
import warnings
from collections import Counter

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .collate import PromptCollator, SFTCollator, prompt_text, record_images
from ..utils.distributed import world_and_rank
from .sources import check_source_args, fit_pixels, open_image, read_source

log = logging.getLogger("lightning_r1v2.data")


class RecordDataset(Dataset):
    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return self.records[i]


class StatefulRandomSampler(DistributedSampler):
    """A seeded shuffling sampler that can resume mid-epoch, and shards itself across ranks.

    Epoch ``e`` uses permutation ``randperm(n, seed + e)``, the same on every rank; ``state_dict``
    holds the epoch and how many indices of it all ranks together were handed out (``consumed``).
    With ``num_replicas`` ranks, rank ``r`` takes ``rest[r::num_replicas]`` of the permutation's
    unconsumed ``rest``, cut to the same length on every rank, so a resumed run continues the
    permutation where the ranks stopped, even on another number of ranks. Lightning calls
    ``set_epoch`` at the start of every epoch (its own epoch count, restored on resume), so the
    permutation follows the trainer's epoch even when an epoch's iterator is left unfinished
    (``drop_last``, ``max_steps``).

    A ``DistributedSampler`` by type only, so that Lightning does not wrap it in its
    ``DistributedSamplerWrapper``: that wrapper materialises ``list(sampler)`` once and indexes it by
    ``range(len(sampler))``, which fails (``IndexError``) when a resumed sampler hands out only the
    rest of an epoch, and would count positions per rank rather than for the whole permutation.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        # DistributedSampler.__init__ is not called: it needs a dataset and a process group
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, True
        self.epoch, self.consumed = 0, 0
        self._resume_from = 0

    def __len__(self) -> int:
        return self.n // self.num_replicas  # this rank's share of a whole epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        world, start = self.num_replicas, self._resume_from
        self._resume_from = 0
        rest = self._order()[start:]
        mine = rest[self.rank: len(rest) // world * world: world]
        self.consumed = start
        for i in mine:
            self.consumed += world  # every rank hands out one index per step of the loop
            yield i
        self.epoch += 1
        self.consumed = 0

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s permutation from its start, unless a resumed position is for it."""
        if int(epoch) != self.epoch:
            self.epoch, self._resume_from, self.consumed = int(epoch), 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n", self.n) != self.n:
            raise ValueError(f"sampler state is for {state['n']} records, the dataset has {self.n}")
        self.epoch, self._resume_from = int(state["epoch"]), int(state["consumed"])


def _image_sizes(record: dict) -> list[tuple[int, int]]:
    """The record's image sizes as the processor gets them (after ``_resize``)."""
    out = []
    for p in record_images(record):
        with open_image(p) as im:
            out.append(fit_pixels(im.size, *(record.get("_resize") or (0, 0))))
    return out


def prompt_length(processor, record: dict) -> int:
    """Tokens of the record's expanded prompt (text plus image tokens), without running the model.

    The processor expands the prompt over blank images of the record's image sizes (the image
    token count depends only on the size: tiles, patches), so the count is exact for every family.
    Sizes are those ``load_images`` gives (after ``record["_resize"]``); only image headers are read.
    """
    text = prompt_text(processor, record)
    sizes = _image_sizes(record)
    kw = {"images": [Image.new("RGB", wh) for wh in sizes]} if sizes else {}
    return len(processor(text=[text], **kw)["input_ids"][0])


class R1V2DataModule(L.LightningDataModule):
    """Records for every stage.

    Args:
        train_file: Training records (prompts for GRPO, SFT targets in ``response``): a JSONL
            file, a ``save_to_disk`` folder, parquet/arrow files (a path or a glob) or LLaVA JSON.
        val_file: Held-out records (evaluated by generation), in the same kinds of source.
        kind: ``sft`` (prompt + response batches) or ``prompts`` (prompts only, for GRPO).
        batch_size: Records per training batch (GRPO: prompts per step).
        eval_batch_size: Records per validation batch (batched generation).
        max_prompt_tokens: Prompts longer than this (image tokens included) are skipped and
            counted, never truncated.
        strict: Stop at the first bad record (``file:line: reason``); else skip and count.
            Either way, fewer usable training records than one batch is an error.
        max_response_tokens: SFT records whose ``response`` is longer are skipped and counted.
        allow_outside_paths: Let image paths point outside the JSONL file's folder.
        max_train_records: Use only the first N training records (0: all).
        max_val_records: Use only the first N held-out records (0: all).
        seed: Shuffling seed.
        num_workers: DataLoader workers.
        format: ``auto`` (from the path), ``jsonl``, ``hf``, ``parquet``, ``arrow`` or ``llava``.
        columns: Dataset column names (``hf``/``parquet``/``arrow``): ``question_key``,
            ``answer_key``, ``image_key``, ``choices_key``, ``response_key``, ``id_key``
            (``sources.ColumnMap``), e.g. ``{question_key: problem, image_key: images}``.
        max_pixels: Images larger than this (width x height) are scaled down, aspect kept, before
            the processor sees them (0: never), for every family; bounds tiles and patches.
        min_pixels: Images smaller than this are scaled up, aspect kept (0: never).
    """

    def __init__(
        self,
        train_file: str = "data/tiny/train.jsonl",
        val_file: str | None = "data/tiny/val.jsonl",
        kind: str = "sft",
        batch_size: int = 32,
        eval_batch_size: int = 100,
        max_prompt_tokens: int = 256,
        strict: bool = True,
        max_response_tokens: int = 4096,
        allow_outside_paths: bool = False,
        max_train_records: int = 0,
        max_val_records: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        format: str = "auto",
        columns: dict[str, str] | None = None,
        max_pixels: int = 0,
        min_pixels: int = 0,
    ):
        super().__init__()
        if kind not in ("sft", "prompts"):
            raise ValueError(f"kind must be 'sft' or 'prompts', got {kind!r}")
        check_source_args(format, columns)  # unknown format or column keys fail here, before any data is read
        if min_pixels < 0 or max_pixels < 0 or (max_pixels and min_pixels > max_pixels):
            raise ValueError(f"need 0 <= min_pixels <= max_pixels (or max_pixels 0), got {min_pixels}, {max_pixels}")
        self.save_hyperparameters()
        self.train_records: list[dict] = []
        self.val_records: list[dict] = []
        self.skipped: Counter = Counter()
        self.sampler: StatefulRandomSampler | None = None
        self.processor = None

    def _processor(self):
        if self.processor is None:
            self.processor = self.trainer.lightning_module.processor
        return self.processor

    def _load(self, path: str, limit: int) -> list[dict]:
        hp = self.hparams
        records, report = read_source(path, format=hp.format, columns=hp.columns, strict=hp.strict,
                                      allow_outside_paths=hp.allow_outside_paths)
        self.skipped.update(report.skipped)
        if limit:
            records = records[:limit]
        if hp.max_pixels or hp.min_pixels:
            for r in records:
                r["_resize"] = [hp.min_pixels, hp.max_pixels]
        if hp.kind == "sft" and path == hp.train_file:
            missing = [r["_source"] for r in records if not r.get("response")]
            if missing:
                raise ValueError(f"{missing[0]}: SFT record has no 'response' ({len(missing)} such records)")
        kept = []
        for r in records:
            n = prompt_length(self._processor(), r)
            if n > hp.max_prompt_tokens:
                self.skipped["prompt_too_long"] += 1
                sizes = _image_sizes(r)
                log.warning("%s: prompt has %d tokens (limit %d)%s, skipped", r["_source"], n, hp.max_prompt_tokens,
                            f"; images of {sizes} pixels (max_pixels resizes them)" if sizes else "")
                continue
            if hp.kind == "sft" and r.get("response"):
                m = len(self._processor().tokenizer(r["response"], add_special_tokens=False)["input_ids"])
                if m > hp.max_response_tokens:
                    self.skipped["response_too_long"] += 1
                    log.warning("%s: response has %d tokens (limit %d), skipped", r["_source"], m, hp.max_response_tokens)
                    continue
            kept.append(r)
        return kept

    def setup(self, stage: str | None = None):
        hp = self.hparams
        if stage in ("fit", None) and not self.train_records:
            self.train_records = self._load(hp.train_file, hp.max_train_records)
            if not self.train_records:
                raise ValueError(f"{hp.train_file}: no usable training records")
            self._require_one_batch("training records")
        if hp.val_file and not self.val_records and stage in ("fit", "validate", "test", None):
            self.val_records = self._load(hp.val_file, hp.max_val_records)
        if self.skipped:
            log.warning("skipped records: %s", dict(self.skipped))

    def _require_one_batch(self, what: str) -> None:
        """Fewer training rows than one batch on every rank (the loader drops a short last batch) would
        train nothing and write no checkpoint: an error naming the file instead."""
        hp = self.hparams
        need = hp.batch_size * world_and_rank()[0]
        if len(self.train_records) < need:
            raise ValueError(
                f"{hp.train_file}: {len(self.train_records)} usable {what}, fewer than one batch "
                f"on each rank ({need}; skipped: {dict(self.skipped) or 'none'})"
            )

    def _train_sampler(self) -> StatefulRandomSampler:
        """The resumable sampler over the training records (restored from a checkpoint if pending)."""
        if self.sampler is None:
            self.sampler = self._new_sampler()
            pending = getattr(self, "_pending_sampler_state", None)
            if pending:
                self.sampler.load_state_dict(pending)
        return self.sampler

    def _new_sampler(self) -> StatefulRandomSampler:
        world, rank = world_and_rank()
        return StatefulRandomSampler(len(self.train_records), seed=self.hparams.seed, num_replicas=world, rank=rank)

    def train_dataloader(self):
        hp = self.hparams
        self._train_sampler()
        collate = SFTCollator(self._processor()) if hp.kind == "sft" else PromptCollator(self._processor())
        return DataLoader(
            RecordDataset(self.train_records),
            batch_size=hp.batch_size,
            sampler=self.sampler,
            collate_fn=collate,
            drop_last=True,
            num_workers=hp.num_workers,
            generator=loader_generator(hp.seed),
        )

    def val_dataloader(self):
        if not self.val_records:
            return []
        return DataLoader(
            RecordDataset(self.val_records),
            batch_size=self.hparams.eval_batch_size,
            shuffle=False,
            collate_fn=PromptCollator(self._processor()),
            num_workers=self.hparams.num_workers,
        )

    def test_dataloader(self):
        return self.val_dataloader()

    # -------------------------------------------------------------- checkpoints
    # Lightning saves ``state_dict()`` under the class name in every checkpoint and calls
    # ``load_state_dict`` on resume after ``setup`` and before ``train_dataloader``. Lightning itself
    # only restores loaders that are stateful; a plain DataLoader over our sampler is not, so the
    # position in the epoch travels here.
    def state_dict(self) -> dict:
        sampler = self.sampler.state_dict() if self.sampler else None
        if sampler is not None and self.trainer is not None:
            # The loader prefetches, so the sampler has handed out more indices than were trained
            # on; the truth is the loop's count of completed batches in this epoch.
            # Every rank trained ``done`` batches of its own share: the permutation's position is
            # ``done * batch_size * ranks``.
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
            sampler["consumed"] = min(done * self.hparams.batch_size * self.sampler.num_replicas, sampler["n"])
            sampler["epoch"] = self.trainer.current_epoch
        return {"sampler": sampler, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sampler") and self.train_records:
            self.sampler = self._new_sampler()
            self.sampler.load_state_dict(state["sampler"])
        elif state.get("sampler"):
            self._pending_sampler_state = state["sampler"]
        if state.get("sampler"):
            # Lightning warns on a mid-epoch resume unless the DataLoader object itself is
            # stateful; here the sampler's position was restored, so the warning is wrong.
            warnings.filterwarnings("ignore", message=_NOT_RESUMABLE_WARNING)


_NOT_RESUMABLE_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


def loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator (for its per-iterator base seed).

    Without one, every ``iter(loader)`` draws from the global torch RNG, and a run resumed at an
    epoch boundary (whose iterator is made before the RNG state is restored) would then sample
    differently from a run never stopped.
    """
    return torch.Generator().manual_seed(int(seed))
