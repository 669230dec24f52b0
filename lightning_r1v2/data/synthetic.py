"""The synthetic visual reasoning task of the embedded default.

Each image is a grid of cells; a cell is empty or holds one shape (square, circle, triangle) of
one colour. The generator writes the ground truth of every image as ``annotations`` (the objects
and the count of each colour), which the rewards and the hallucination monitor check against.

Question types (all answered from the colour counts):

- ``count``   "How many red shapes are there?"                  -> "2"
- ``most``    "Which colour is most frequent?"                   -> "blue" (scenes with a unique maximum)
- ``compare`` "Are there more red than blue shapes?"             -> "yes" / "no" (counts differ)
- ``choice``  "How many green shapes are there? (A) 1 (B) 2 ..." -> "B" (``choices`` holds the options)
- ``diff``    "How many more red than blue shapes are there?"   -> "2" (two steps: two counts, then a
  subtraction; the first colour has more; not drawn by default, ask for it with ``questions``)

The reference response (used by SFT) lists every colour's count in the reasoning block, then
gives the answer in ``\\boxed{}``::

    <think> red 2 green 0 blue 3 yellow 1 </think> \\boxed{2}

so a claim in the reasoning can be checked against the image. Same seed, same bytes.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
    "orange": (240, 130, 20),
}
SHAPES = ("square", "circle", "triangle")
DEFAULT_QUESTION_TYPES = ("count", "most", "compare", "choice")
QUESTION_TYPES = DEFAULT_QUESTION_TYPES + ("diff",)
LETTERS = "ABCD"


@dataclass
class TaskConfig:
    """Knobs of the synthetic task; ``difficulty`` picks a preset for the others."""

    difficulty: str = "easy"
    """``easy`` (2x2 grid, 3 colours), ``medium`` (2x2, 4 colours), ``hard`` (3x3, 4 colours)."""
    image_size: int = 0
    """Image side in pixels (0: 16 per cell, so that one image token of the tiny VLM sees one cell)."""
    question_types: tuple[str, ...] = DEFAULT_QUESTION_TYPES
    """Which question types to draw from, uniformly (``diff`` is not in the default set)."""
    fill: float = 0.8
    """Probability that a cell holds a shape."""
    grid: int = field(default=0)
    """Cells per side (0: from ``difficulty``)."""
    colours: tuple[str, ...] = ()
    """Colours used (empty: from ``difficulty``)."""

    def __post_init__(self):
        presets = {"easy": (2, 3), "medium": (2, 4), "hard": (3, 4)}
        if self.difficulty not in presets:
            raise ValueError(f"difficulty must be one of {sorted(presets)}, got {self.difficulty!r}")
        grid, n_colours = presets[self.difficulty]
        self.grid = self.grid or grid
        self.image_size = self.image_size or 16 * self.grid
        self.colours = tuple(self.colours) or tuple(PALETTE)[:n_colours]
        bad = [q for q in self.question_types if q not in QUESTION_TYPES]
        if bad:
            raise ValueError(f"unknown question types {bad}; choose from {QUESTION_TYPES}")
        unknown = [c for c in self.colours if c not in PALETTE]
        if unknown:
            raise ValueError(f"unknown colours {unknown}; choose from {sorted(PALETTE)}")


def draw_scene(rng: random.Random, cfg: TaskConfig) -> tuple[Image.Image, dict]:
    """Draw one scene; return the image and its annotations."""
    size, grid = cfg.image_size, cfg.grid
    cell = size // grid
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    objects = []
    for row in range(grid):
        for col in range(grid):
            if rng.random() >= cfg.fill:
                continue
            colour = rng.choice(cfg.colours)
            shape = rng.choice(SHAPES)
            half = rng.randint(cell * 3 // 10, cell * 4 // 10)
            cx = col * cell + cell // 2 + rng.randint(-1, 1)
            cy = row * cell + cell // 2 + rng.randint(-1, 1)
            box = (cx - half, cy - half, cx + half, cy + half)
            fill = PALETTE[colour]
            if shape == "square":
                draw.rectangle(box, fill=fill)
            elif shape == "circle":
                draw.ellipse(box, fill=fill)
            else:
                draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
            objects.append({"row": row, "col": col, "shape": shape, "colour": colour})
    counts = {c: sum(o["colour"] == c for o in objects) for c in cfg.colours}
    return img, {"grid": grid, "objects": objects, "counts": counts}


def make_question(rng: random.Random, cfg: TaskConfig, counts: dict[str, int]) -> dict | None:
    """A question about ``counts``, or None when this scene cannot pose the drawn type."""
    qtype = rng.choice(cfg.question_types)
    colours = list(cfg.colours)
    if qtype == "count":
        c = rng.choice(colours)
        return {"type": qtype, "question": f"How many {c} shapes are there?", "answer": str(counts[c])}
    if qtype == "most":
        best = max(counts.values())
        winners = [c for c in colours if counts[c] == best]
        if len(winners) != 1:
            return None
        return {"type": qtype, "question": "Which colour is most frequent?", "answer": winners[0]}
    if qtype == "compare":
        a, b = rng.sample(colours, 2)
        if counts[a] == counts[b]:
            return None
        answer = "yes" if counts[a] > counts[b] else "no"
        return {"type": qtype, "question": f"Are there more {a} than {b} shapes?", "answer": answer}
    if qtype == "diff":
        a, b = rng.sample(colours, 2)
        if counts[a] == counts[b]:
            return None
        a, b = (a, b) if counts[a] > counts[b] else (b, a)
        return {"type": qtype, "question": f"How many more {a} than {b} shapes are there?",
                "answer": str(counts[a] - counts[b])}
    # choice: four consecutive counts containing the true one
    c = rng.choice(colours)
    true = counts[c]
    start = max(0, true - rng.randint(0, 3))
    options = [str(n) for n in range(start, start + 4)]
    letter = LETTERS[options.index(str(true))]
    listed = " ".join(f"({L}) {o}" for L, o in zip(LETTERS, options))
    return {
        "type": qtype,
        "question": f"How many {c} shapes are there? {listed} Answer with the letter.",
        "answer": letter,
        "choices": options,
    }


def reference_response(counts: dict[str, int], answer: str) -> str:
    """The SFT target: every colour's count in the reasoning, then the boxed answer."""
    listed = " ".join(f"{c} {n}" for c, n in counts.items())
    return f"<think> {listed} </think> \\boxed{{{answer}}}"


def draw_records(split: str, n: int, seed: int, cfg: TaskConfig):
    """Yield ``n`` records of ``split`` (without ``image``) with their images, in order."""
    rng = random.Random(f"{seed}-{split}")
    i = 0
    while i < n:
        img, ann = draw_scene(rng, cfg)
        q = make_question(rng, cfg, ann["counts"])
        if q is None:
            continue
        rec = {"id": f"{split}-{i:06d}", "question": q["question"], "answer": q["answer"]}
        if "choices" in q:
            rec["choices"] = q["choices"]
        rec["type"] = q["type"]
        rec["annotations"] = ann
        rec["response"] = reference_response(ann["counts"], q["answer"])
        yield rec, img
        i += 1


def generate_split(out: Path, split: str, n: int, seed: int, cfg: TaskConfig) -> Path:
    """Write ``n`` records and their PNGs under ``out``; return the JSONL path."""
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    path = out / f"{split}.jsonl"
    with path.open("w") as f:
        for i, (rec, img) in enumerate(draw_records(split, n, seed, cfg)):
            rel = f"images/{split}/{i:06d}.png"
            img.save(out / rel, format="PNG", optimize=False)
            f.write(json.dumps({"id": rec["id"], "image": rel, **rec}) + "\n")
    return path


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_llava(out: Path, split: str, n: int, seed: int, cfg: TaskConfig) -> Path:
    """LLaVA-style JSON: ``{split}.json``, a list of ``{id, image, conversations, answer, ...}`` (PNGs beside)."""
    img_dir = out / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (rec, img) in enumerate(draw_records(split, n, seed, cfg)):
        rel = f"images/{split}/{i:06d}.png"
        img.save(out / rel, format="PNG", optimize=False)
        turns = [{"from": "human", "value": "<image>\n" + rec.pop("question")},
                 {"from": "gpt", "value": rec.pop("response")}]
        rows.append({"id": rec.pop("id"), "image": rel, "conversations": turns, **rec})
    path = out / f"{split}.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def _dataset(rows: list[dict], image_column: str, many: bool):
    import datasets

    image = datasets.Image()
    return datasets.Dataset.from_list(rows).cast_column(image_column, datasets.List(image) if many else image)


def write_parquet(out: Path, split: str, n: int, seed: int, cfg: TaskConfig) -> Path:
    """``{split}.parquet`` in geometry3k's column layout: ``images`` (a list of ``{bytes, path}``, the
    PNG embedded), ``problem`` (the question after an ``<image>`` mark), ``answer``; plus ``id``,
    ``choices``, ``type``, ``annotations``, ``response``."""
    rows = []
    for i, (rec, img) in enumerate(draw_records(split, n, seed, cfg)):
        row = {"images": [{"bytes": _png(img), "path": f"{i:06d}.png"}], "problem": "<image>" + rec.pop("question")}
        rows.append({**row, **rec, "choices": rec.get("choices")})
    path = out / f"{split}.parquet"
    _dataset(rows, "images", many=True).to_parquet(str(path))
    return path


def write_hf(out: Path, split: str, n: int, seed: int, cfg: TaskConfig) -> Path:
    """A ``save_to_disk`` folder ``{split}/`` with our field names and one embedded ``image`` per row."""
    rows = []
    for i, (rec, img) in enumerate(draw_records(split, n, seed, cfg)):
        rows.append({"image": {"bytes": _png(img), "path": f"{i:06d}.png"}, **rec, "choices": rec.get("choices")})
    path = out / split
    _dataset(rows, "image", many=False).save_to_disk(str(path))
    return path


WRITERS = {"jsonl": generate_split, "llava": write_llava, "parquet": write_parquet, "hf": write_hf}
# the column mapping each format needs in the DataModule (``columns``)
COLUMNS = {"parquet": {"question_key": "problem", "image_key": "images"}}


def make_data(
    out: str = "data/tiny",
    train: int = 4000,
    val: int = 500,
    test: int = 0,
    seed: int = 0,
    difficulty: str = "easy",
    image_size: int = 0,
    format: str = "jsonl",
    questions: list[str] | None = None,
) -> dict[str, str]:
    """Generate the synthetic task: ``train.jsonl``, ``val.jsonl`` (and ``test.jsonl``) with PNGs,
    or the same records in another shape (``format``).

    Each split draws from its own stream (seed and split name), so the held-out split never
    shares a scene with training, and the same seed writes the same bytes.

    Args:
        out: Output folder.
        train: Number of training records.
        val: Number of held-out records.
        test: Number of test records (0: none).
        seed: Random seed.
        difficulty: ``easy``, ``medium`` or ``hard`` (``hard`` draws 48 px images: give the tiny
            model ``image_size: 48`` too, so that its 9 image tokens match the 3x3 cells).
        image_size: Image side in pixels (0: 16 per cell).
        format: ``jsonl`` (``{split}.jsonl`` + PNGs), ``llava`` (``{split}.json`` + PNGs),
            ``parquet`` (``{split}.parquet``, geometry3k's columns, images embedded; read it with
            ``columns: {question_key: problem, image_key: images}``) or ``hf`` (``save_to_disk``
            folders ``{split}/``, images embedded). The same seed gives the same records in each.
        questions: Question types to draw from (None: ``count``, ``most``, ``compare``,
            ``choice``); e.g. ``[diff, compare, most]`` for questions that each need two counts.
    """
    if format not in WRITERS:
        raise ValueError(f"format must be one of {sorted(WRITERS)}, got {format!r}")
    cfg = TaskConfig(difficulty=difficulty, image_size=image_size,
                     question_types=tuple(questions) if questions else DEFAULT_QUESTION_TYPES)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", train), ("val", val), ("test", test)):
        if n > 0:
            written[split] = str(WRITERS[format](root, split, n, seed, cfg))
            print(f"make-data: wrote {n} records to {written[split]}")
    return written
