"""Record sources: the shapes data comes in, each read into the same plain-dict records.

``read_source(path, format, columns)`` reads one file or folder:

- ``jsonl``: our records, one JSON object per line (``records.read_records``);
- ``hf``: one split of a Hugging Face dataset saved with ``save_to_disk`` (``datasets.load_from_disk``);
- ``parquet`` / ``arrow``: parquet files, or arrow files as ``save_to_disk`` writes them (a path or a
  glob), through ``datasets``; ``columns`` maps their column names to ours (``ColumnMap``);
- ``llava``: LLaVA-style JSON (a list of objects, or one per line) with ``conversations`` of
  ``from``/``value`` turns and ``<image>`` placeholders, ``image`` a path or a list of paths.

``auto`` picks by the path: ``.jsonl``, ``.json`` (llava), ``.parquet``, ``.arrow``, a folder
(``hf``). Every source gives ``{id, question, answer, image?, choices?, response?, ..., _source}``:
the other columns or keys ride along unchanged (``annotations``, ``chosen``, ...), ``image`` is
absent for a text-only record, and ``_source`` is ``file:line`` (jsonl), ``file:row N`` (``N`` as
in ``dataset[N]``) or ``file:entry N`` (the N-th object of a LLaVA JSON list).

Images are never all held in memory. An image path stays a path (absolute). An image embedded in a
dataset (``{"bytes", "path"}``, the ``datasets.Image`` storage) becomes a reference, plain data
that pickles, travels to DataLoader workers and into checkpoints::

    {"dataset": "parquet:/abs/train.parquet", "row": 12, "column": "images", "index": 0}

whose bytes ``open_image`` reads from the memory-mapped arrow table when a batch is built
(``index`` is None when the column holds one image, not a list).

Validation is ``records.validate_record``'s for every source, plus: a column named in ``columns``
that does not exist (an error listing the columns that do); ``<image>`` placeholders in an
``hf``/``parquet``/``arrow``/``llava`` question, which mark where the row's images go, must number
0 or exactly the row's images (then they are removed: the chat template places the images) - a
literal ``<image>`` in a question with no image is a bad row; an embedded image that does not
decode. Bad rows raise ``RecordError("file:row N: reason")`` (strict) or are skipped and counted
in the ``ReadReport``.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .records import ReadReport, RecordError, _check_image, read_records, validate_record

log = logging.getLogger("lightning_r1v2.data")

FORMATS = ("auto", "jsonl", "hf", "parquet", "arrow", "llava")
PLACEHOLDER = "<image>"  # how HF datasets (geometry3k, ...) and LLaVA JSON mark an image in the text
_PLACEHOLDER_RE = re.compile(re.escape(PLACEHOLDER) + r"[ \t]*\n?")
_READ_BATCH = 256  # rows converted to Python at a time while reading a dataset


@dataclass
class ColumnMap:
    """Which column of a dataset holds each field of a record (``hf``, ``parquet``, ``arrow``).

    Columns not named here are kept under their own names (``annotations``, ``chosen``, ...).
    """

    question_key: str = "question"
    """The question (prompt text); ``<image>`` marks in it are checked and removed."""
    answer_key: str = "answer"
    """The reference answer (rewards, evaluation)."""
    image_key: str | None = None
    """The images: one image or a list, each ``{"bytes", "path"}`` or a path (None: ``image`` or
    ``images`` if either exists, else the rows are text only)."""
    choices_key: str = "choices"
    """Multiple-choice options, if any."""
    response_key: str = "response"
    """The SFT target, if any."""
    id_key: str = "id"
    """A row id (absent: ``<file stem>-<row>``)."""

    @classmethod
    def build(cls, columns: dict | ColumnMap | None) -> ColumnMap:
        if isinstance(columns, ColumnMap):
            return columns
        columns = dict(columns or {})
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(columns) - set(names))
        if unknown:
            raise ValueError(f"columns: unknown key(s) {unknown}; the keys are {names}")
        return cls(**columns)


def detect_format(path: str | Path) -> str:
    """The format ``auto`` picks for ``path``."""
    p = str(path)
    if p.endswith(".jsonl"):
        return "jsonl"
    if p.endswith(".json"):
        return "llava"
    if p.endswith(".parquet"):
        return "parquet"
    if p.endswith(".arrow"):
        return "arrow"
    if Path(p).is_dir():
        return "hf"
    raise ValueError(f"{p}: cannot tell the format from the name (.jsonl, .json, .parquet, .arrow or a dataset folder); "
                     f"set format to one of {FORMATS[1:]}")


def check_source_args(format: str, columns: dict | None) -> None:
    """Fail on an unknown ``format`` or ``columns`` key before any data is read (or a policy loaded)."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    ColumnMap.build(columns)


def is_embedded(entry) -> bool:
    """Whether an image entry is a reference into a dataset's table (not a path)."""
    return isinstance(entry, dict) and "dataset" in entry


def read_source(path: str | Path, format: str = "auto", columns: dict | None = None, strict: bool = True,
                check_images: bool = True, allow_outside_paths: bool = True) -> tuple[list[dict], ReadReport]:
    """Read and validate the records of ``path`` (see the module docstring).

    Returns the good records and a ``ReadReport``; strict: the first bad row raises ``RecordError``
    naming its ``file:line`` / ``file:row N``; else bad rows are skipped and counted.
    ``check_images``: decode every image once while reading (bad bytes or files are bad rows).
    ``allow_outside_paths``: JSONL image paths may leave the JSONL's folder (``read_records``).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    fmt = detect_format(path) if format == "auto" else format
    if fmt in ("jsonl", "llava") and columns:
        raise ValueError(f"{path}: columns apply to hf, parquet and arrow sources, not {fmt}")
    if fmt == "jsonl":
        return read_records(path, strict=strict, check_images=check_images, allow_outside_paths=allow_outside_paths)
    if fmt == "llava":
        return _read_llava(Path(path), strict, check_images)
    return _read_dataset(str(path), fmt, ColumnMap.build(columns), strict, check_images)


# ------------------------------------------------------------------------------ datasets
_OPEN: dict[str, object] = {}  # spec -> datasets.Dataset, per process (memory-mapped, not copied)
_IMAGE_VIEWS: dict[tuple[str, str], object] = {}  # (spec, column) -> that column in arrow format


def open_dataset(spec: str):
    """The ``datasets.Dataset`` of a spec ``"hf:<folder>"``, ``"parquet:<file>"`` or ``"arrow:<file>"``.

    Opened once per process and memory-mapped: rows are read from disk when asked for.
    """
    if spec not in _OPEN:
        import datasets

        fmt, _, where = spec.partition(":")
        if fmt == "hf":
            ds = datasets.load_from_disk(where)
            if isinstance(ds, datasets.DatasetDict):
                splits = list(ds)
                raise ValueError(f"{where}: a DatasetDict with splits {splits}; name one split's folder, "
                                 f"e.g. {Path(where) / splits[0]}")
        elif fmt == "parquet":
            ds = datasets.load_dataset("parquet", data_files=[where], split="train")
        elif fmt == "arrow":
            ds = datasets.Dataset.from_file(where)
        else:
            raise ValueError(f"unknown dataset spec {spec!r}")
        _OPEN[spec] = ds
    return _OPEN[spec]


def _specs(path: str, fmt: str) -> list[tuple[str, str]]:
    """``(spec, name for messages)`` per file of ``path`` (a glob gives several, sorted)."""
    if fmt == "hf":
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such dataset folder (written by save_to_disk)")
        return [(f"hf:{Path(path).resolve()}", path)]
    files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
    if not files or not all(Path(f).is_file() for f in files):
        raise FileNotFoundError(f"{path}: no such {fmt} file")
    return [(f"{fmt}:{Path(f).resolve()}", f) for f in files]


def _resolve_columns(cols: ColumnMap, names: list[str], where: str) -> dict[str, str | None]:
    """Our field -> the dataset's column (None: absent); a named column that is missing is an error."""
    default = ColumnMap()
    out = {}
    for f in fields(ColumnMap):
        field_name = f.name[: -len("_key")]
        col = getattr(cols, f.name)
        if f.name == "image_key" and col is None:
            col = next((c for c in ("image", "images") if c in names), None)
            if col is None:
                log.info("%s: no image column ('image' or 'images'); the rows are text only", where)
        elif col not in names:
            if field_name in ("question", "answer") or col != getattr(default, f.name):
                raise ValueError(f"{where}: column {col!r} ({f.name}) does not exist; the columns are {names}")
            col = None  # an optional field under its default name, not in this dataset
        out[field_name] = col
    return out


class _BadRow(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _image_entries(value, spec: str, row: int, column: str, root: Path) -> tuple[list, list[bytes]]:
    """A row's image cell -> record entries (paths or references) and the embedded bytes (for checks)."""
    if value is None:
        return [], []
    items, listed = (value, True) if isinstance(value, list) else ([value], False)
    entries, blobs = [], []
    for j, v in enumerate(items):
        if isinstance(v, dict) and v.get("bytes") is not None:
            entries.append({"dataset": spec, "row": row, "column": column, "index": j if listed else None})
            blobs.append(v["bytes"])
        elif isinstance(v, dict) and v.get("path"):
            entries.append(str(root / v["path"]))
        elif isinstance(v, str) and v:
            entries.append(str(root / v))
        else:
            shown = f"{type(v).__name__} {v!r:.60}"
            raise _BadRow("wrong_type", f"column {column!r}: image {j} is {shown}, expected bytes, a path or "
                                        "{'bytes', 'path'}")
    return entries, blobs


def _check_bytes(blob: bytes, what: str) -> str | None:
    try:
        with Image.open(io.BytesIO(blob)) as im:
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"image cannot be decoded ({type(e).__name__}: {e}): {what}"
    return None


def _strip_placeholders(rec: dict, n_images: int) -> None:
    """Remove the question's ``<image>`` marks when they number the record's images; else a bad row."""
    q = rec.get("question")
    if not isinstance(q, str):
        return  # validate_record names the wrong type
    n = q.count(PLACEHOLDER)
    if n == 0:
        return
    if n != n_images:
        raise _BadRow("image_placeholder", f"'question' holds {n} {PLACEHOLDER} placeholder(s) but the record has "
                                           f"{n_images} image(s)")
    rec["question"] = _PLACEHOLDER_RE.sub("", q).strip()


def _finish(rec: dict, entries: list, root: Path, where: str, check_images: bool, blobs=()) -> dict:
    """Checks shared by the dataset and LLaVA readers; the record ready to use (or ``_BadRow``)."""
    _strip_placeholders(rec, len(entries))
    problem = validate_record({**rec, "image": None}, root, check_images=False)
    if problem:
        raise _BadRow(*problem)
    if check_images:
        for e in entries:
            if isinstance(e, str):
                reason = _check_image(Path(e))
                if reason:
                    raise _BadRow("missing_image" if "not found" in reason else "bad_image", reason)
        for k, blob in enumerate(blobs):
            reason = _check_bytes(blob, f"embedded image {k}")
            if reason:
                raise _BadRow("bad_image", reason)
    rec["answer"] = str(rec["answer"])
    if rec.get("choices") is not None:
        rec["choices"] = [str(c) for c in rec["choices"]]
    if entries:
        rec["image"] = entries
    else:
        rec.pop("image", None)
    rec["_source"] = where
    return rec


def _read_dataset(path: str, fmt: str, cols: ColumnMap, strict: bool, check_images: bool):
    report = ReadReport(path=path)
    records: list[dict] = []
    for spec, name in _specs(path, fmt):
        ds = open_dataset(spec)
        root = Path(spec.partition(":")[2])
        root = root if fmt == "hf" else root.parent
        mapping = _resolve_columns(cols, list(ds.column_names), name)
        renamed = {c for c in mapping.values() if c}
        image_col = mapping.pop("image")
        raw = ds.with_format("arrow")  # image cells stay {"bytes", "path"}: nothing is decoded here
        row = 0
        for table in raw.iter(batch_size=_READ_BATCH):
            for cells in table.to_pylist():
                where = f"{name}:row {row}"
                try:
                    rec = {k: v for k, v in cells.items() if k not in renamed}
                    for ours, col in mapping.items():
                        rec.pop(ours, None)  # a column under our name is not the mapped one
                        if col is not None and cells[col] is not None:
                            rec[ours] = cells[col]
                    rec.setdefault("id", f"{Path(name).stem}-{row}")
                    entries, blobs = ([], []) if image_col is None else _image_entries(
                        cells[image_col], spec, row, image_col, root)
                    records.append(_finish(rec, entries, root, where, check_images, blobs))
                except _BadRow as e:
                    report.reject(e.kind, f"{where}: {e.reason}", strict)
                row += 1
    report.kept = len(records)
    if report.total_skipped:
        log.warning("%s", report.summary())
    return records, report


# ---------------------------------------------------------------------------------- LLaVA
_HUMAN, _GPT = ("human", "user"), ("gpt", "assistant")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _llava_record(item, i: int, stem: str) -> dict:
    """One LLaVA object -> our record fields (``image`` still as written, relative)."""
    if not isinstance(item, dict):
        raise _BadRow("not_an_object", f"entry is a {type(item).__name__}, expected a JSON object")
    turns = item.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _BadRow("missing_field", "missing field 'conversations' (a list of {from, value} turns)")
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        raise _BadRow("wrong_type", "'conversations' must hold {from, value} objects with string values")
    roles = [t.get("from") for t in turns]
    if roles[0] not in _HUMAN or len(turns) > 2 or (len(turns) == 2 and roles[1] not in _GPT):
        raise _BadRow("unsupported_turns", f"conversation turns {roles}: only one human turn, optionally followed "
                                           "by one gpt reply, are supported")
    rec = {k: v for k, v in item.items() if k != "conversations"}
    rec["question"] = turns[0]["value"]
    if len(turns) == 2:
        rec["response"] = turns[1]["value"]
    if rec.get("answer") is None and rec.get("response") is not None:
        boxed = _BOXED.findall(rec["response"])
        rec["answer"] = boxed[-1] if boxed else rec["response"]
    rec.setdefault("id", f"{stem}-{i}")
    return rec


def _read_llava(path: Path, strict: bool, check_images: bool):
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such LLaVA JSON file")
    root = path.parent
    report = ReadReport(path=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    items: list[tuple[str, object]] = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                report.reject("bad_json", f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno})", strict)
    else:
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(data, list):
            raise RecordError(f"{path}: expected a JSON list of LLaVA objects, got a {type(data).__name__}")
        items = [(f"{path}:entry {i}", item) for i, item in enumerate(data)]
    records = []
    for i, (where, item) in enumerate(items):
        try:
            rec = _llava_record(item, i, path.stem)
            img = rec.get("image")
            rel = [] if img is None else img if isinstance(img, list) else [img]
            if not all(isinstance(p, str) and p for p in rel) or (img is not None and not rel):
                raise _BadRow("wrong_type", "'image' must be a path or a non-empty list of paths (absent: text only)")
            rec["image_rel"] = img
            records.append(_finish(rec, [str(root / p) for p in rel], root, where, check_images))
        except _BadRow as e:
            report.reject(e.kind, f"{where}: {e.reason}", strict)
    report.kept = len(records)
    if report.total_skipped:
        log.warning("%s", report.summary())
    return records, report


# ------------------------------------------------------------------------------ images
def image_bytes(ref: dict) -> bytes:
    """The encoded bytes of an embedded image reference (read from the memory-mapped table)."""
    key = (ref["dataset"], ref["column"])
    if key not in _IMAGE_VIEWS:
        _IMAGE_VIEWS[key] = open_dataset(ref["dataset"]).select_columns([ref["column"]]).with_format("arrow")
    cell = _IMAGE_VIEWS[key][int(ref["row"])].column(0)[0]
    if ref.get("index") is not None:
        cell = cell.values[int(ref["index"])]
    return cell["bytes"].as_py()


def open_image(entry) -> Image.Image:
    """An image entry of a record (a path or an embedded reference) opened lazily, as ``Image.open``."""
    if is_embedded(entry):
        return Image.open(io.BytesIO(image_bytes(entry)))
    if isinstance(entry, (str, Path)):
        return Image.open(entry)
    raise TypeError(f"an image entry is a path or {{'dataset', 'row', 'column', 'index'}}, got {entry!r:.80}")


def fit_pixels(size: tuple[int, int], min_pixels: int = 0, max_pixels: int = 0) -> tuple[int, int]:
    """``(w, h)`` scaled, keeping the aspect ratio, into ``min_pixels <= w*h <= max_pixels`` (0: no bound)."""
    w, h = size
    area = w * h
    if max_pixels and area > max_pixels:
        s = math.sqrt(max_pixels / area)
        return max(1, math.floor(w * s)), max(1, math.floor(h * s))
    if min_pixels and area < min_pixels:
        s = math.sqrt(min_pixels / area)
        return math.ceil(w * s), math.ceil(h * s)
    return w, h

