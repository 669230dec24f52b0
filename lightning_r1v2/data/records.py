"""JSONL records: reading, validation and error reporting.

One JSON object per line; image paths are relative to the JSONL file::

    {"id", "image"? (path or list of paths; absent or null: text only), "question", "answer",
     "choices"?, "annotations"?, "tests"?, "response"?}

Every record is validated. In strict mode the first bad record raises ``RecordError`` with
``file:line: reason``; in lenient mode bad records are skipped, counted per reason, and the
counts logged, so nothing is dropped silently.
"""
from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

log = logging.getLogger("lightning_r1v2.data")

REQUIRED = ("id", "question", "answer")  # no "image": a text-only record
MAX_QUESTION_CHARS = 4000
MAX_RESPONSE_CHARS = 50_000  # before any tokenizer sees it (a 300k-character response stalled SFT)
MAX_NESTING = 32  # JSON depth of a record; deeper data is refused before any recursive copy meets it
# Image placeholder strings of InternVL-style processors (and the generic ``<image>``). Images come
# from the ``image`` field; the processor writes one placeholder per image and expands it. The
# same text typed into a question or response would add image tokens that no image fills: a crash
# deep in the processor or model ("image features and image tokens do not match", EasyR1 110,
# verl 3469), or, for ``<img>``/``</img>``, silently wrong inputs.
IMAGE_PLACEHOLDERS = ("<IMG_CONTEXT>", "<img>", "</img>", "<image>")


class RecordError(ValueError):
    """A bad record, reported as ``file:line: reason``."""


@dataclass
class ReadReport:
    """What ``read_records`` kept and skipped."""

    path: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def reject(self, kind: str, msg: str, strict: bool, what: str = "record") -> None:
        """Strict: raise ``RecordError(msg)``; lenient: count ``kind`` and log the skip."""
        if strict:
            raise RecordError(msg)
        self.skipped[kind] += 1
        log.warning("skipped %s %s", what, msg)

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.path}: kept {self.kept}, skipped {self.total_skipped} ({reasons})"


def _check_image(path: Path) -> str | None:
    """Reason the image is unusable, or None."""
    if not path.exists():
        return f"image not found: {path}"
    if path.stat().st_size == 0:
        return f"image is an empty file: {path}"
    try:
        with Image.open(path) as im:
            im.load()  # decodes every byte: catches truncated files that verify() misses
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"image cannot be decoded ({type(e).__name__}: {e}): {path}"
    return None


def _depth(obj) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return deepest


def _outside(root: Path, p: str) -> bool:
    base = root.resolve()
    target = (root / p).resolve()
    return target != base and base not in target.parents


def validate_record(
    rec, root: Path, check_images: bool = True, allow_outside_paths: bool = True
) -> tuple[str, str] | None:
    """``(kind, reason)`` when ``rec`` is bad, else None. ``kind`` is the counter key.

    ``allow_outside_paths=False``: image paths must resolve inside ``root`` (no ``../``, no
    absolute paths elsewhere, no symlinks out).
    """
    if not isinstance(rec, dict):
        return "not_an_object", f"record is a {type(rec).__name__}, expected a JSON object"
    if _depth(rec) > MAX_NESTING:
        return "too_deep", f"record is nested more than {MAX_NESTING} levels deep"
    for key in REQUIRED:
        if key not in rec or rec[key] is None:
            return "missing_field", f"missing field {key!r}"
    if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
        return "wrong_type", f"'id' must be a string or integer, got {type(rec['id']).__name__}"
    if not isinstance(rec["question"], str):
        return "wrong_type", f"'question' must be a string, got {type(rec['question']).__name__}"
    if not rec["question"].strip():
        return "empty_field", "'question' is empty"
    if len(rec["question"]) > MAX_QUESTION_CHARS:
        return "too_long", f"'question' has {len(rec['question'])} characters (limit {MAX_QUESTION_CHARS})"
    if not isinstance(rec["answer"], (str, int, float)) or isinstance(rec["answer"], bool):
        return "wrong_type", f"'answer' must be a string or number, got {type(rec['answer']).__name__}"
    if isinstance(rec["answer"], float) and not math.isfinite(rec["answer"]):
        return "wrong_type", f"'answer' must be a finite number, got {rec['answer']}"
    if not str(rec["answer"]).strip():
        return "empty_field", "'answer' is empty"
    for key in ("question", "response"):
        found = [p for p in IMAGE_PLACEHOLDERS if isinstance(rec.get(key), str) and p in rec[key]]
        if found:
            return "image_placeholder", (
                f"{key!r} contains the image placeholder text {', '.join(found)}; images are given by the "
                "'image' field and placed by the processor, so this text would ask for image tokens no image fills"
            )
    img = rec.get("image")
    images = [] if img is None else img if isinstance(img, list) else [img]
    if img is not None and (not images or not all(isinstance(p, str) and p for p in images)):
        return "wrong_type", "'image' must be a path or a non-empty list of paths (absent or null: text only)"
    if "choices" in rec and rec["choices"] is not None:
        if not isinstance(rec["choices"], list) or not all(isinstance(c, (str, int, float)) for c in rec["choices"]):
            return "wrong_type", "'choices' must be a list of strings"
    if "annotations" in rec and rec["annotations"] is not None and not isinstance(rec["annotations"], dict):
        return "wrong_type", "'annotations' must be an object"
    if "tests" in rec and rec["tests"] is not None:
        if not isinstance(rec["tests"], list):
            return "wrong_type", "'tests' must be a list"
        from .code_tests import parse_tests  # the code reward's own rules (rewards/code.py runs them)

        try:
            parse_tests(rec["tests"])
        except ValueError as e:
            return "bad_tests", str(e)
    if "response" in rec and rec["response"] is not None and not isinstance(rec["response"], str):
        return "wrong_type", "'response' must be a string"
    if isinstance(rec.get("response"), str) and len(rec["response"]) > MAX_RESPONSE_CHARS:
        return "too_long", f"'response' has {len(rec['response'])} characters (limit {MAX_RESPONSE_CHARS})"
    if not allow_outside_paths:
        for p in images:
            if _outside(root, p):
                return "image_outside", (
                    f"image path {p!r} points outside the data folder {root} (set allow_outside_paths: true to allow)"
                )
    if check_images:
        for p in images:
            reason = _check_image(root / p)
            if reason:
                return ("missing_image" if "not found" in reason else "bad_image"), reason
    return None


def read_records(
    path: str | Path,
    strict: bool = True,
    check_images: bool = True,
    allow_outside_paths: bool = True,
    min_records: int = 0,
) -> tuple[list[dict], ReadReport]:
    """Read and validate a JSONL file of records.

    Returns the good records (``answer`` coerced to ``str``, ``image`` made absolute and kept
    as the original relative path under ``image_rel``, ``_line`` set) and a ``ReadReport``.
    Raises ``RecordError("file:line: reason")`` on the first bad record when ``strict``, and
    ``RecordError`` when fewer than ``min_records`` are left (e.g. one batch: lenient mode must
    not end a run that trained nothing). ``allow_outside_paths``: see :func:`validate_record`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such records file")
    root = path.parent
    report = ReadReport(path=str(path))
    records: list[dict] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            problem = None
            rec = None
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problem = ("not_utf8", f"line is not valid UTF-8 ({e.reason} at byte {e.start})")
            else:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    problem = ("bad_json", f"bad JSON ({e.msg} at column {e.colno})")
                except RecursionError:
                    problem = ("too_deep", "bad JSON (nested too deeply to parse)")
                except ValueError as e:  # e.g. an integer of more than 4300 digits
                    problem = ("bad_json", f"bad JSON ({str(e)[:120]})")
            if problem is None:
                problem = validate_record(rec, root, check_images=check_images, allow_outside_paths=allow_outside_paths)
            if problem is not None:
                kind, reason = problem
                report.reject(kind, f"{path}:{lineno}: {reason}", strict)
                continue
            rec["answer"] = str(rec["answer"])
            if rec.get("choices") is not None:
                rec["choices"] = [str(c) for c in rec["choices"]]
            if rec.get("image") is not None:
                images = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
                rec["image_rel"] = rec["image"]
                rec["image"] = [str(root / p) for p in images]
            rec["_source"] = f"{path}:{lineno}"
            records.append(rec)
    report.kept = len(records)
    if report.total_skipped:
        log.warning("%s", report.summary())
    if len(records) < min_records:
        raise RecordError(f"{path}: {len(records)} usable records, fewer than {min_records} ({report.summary()})")
    return records, report
