"""The synthetic task, vlmfast's embedded default: images of simple shapes drawn with Pillow and
questions with checkable answers, written in the Geometry3K format.

Splits (deterministic from a seed):
- train / val: light background, the in-domain question templates;
- ood: shifted appearance (dark background, smaller shapes) AND unseen question phrasings
  (the MathVista role: same skills, different surface).

Question types: count_all, count_colour, count_shape, largest_colour (multiple choice), more_than
(a difference of counts); and, not asked by default, `describe` (the shapes, largest first: "red circle, blue
square"), the perception task the study's base model is pretrained on, and `locate_largest` (grounding: the largest
shape's box "[x1, y1, x2, y2]" in pixels, graded by rewards.grounding_iou). Every example also
carries plausible wrong answers (`negatives`) for
dataset negatives in SFT-C and DPO, and its scene (JSON) so answers can be re-derived.
Shapes never overlap (rejection sampling), so every shape is one connected blob of its colour.
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 50, 47), "green": (40, 160, 60), "blue": (38, 100, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
QUESTION_TYPES = ("count_all", "count_colour", "count_shape", "largest_colour", "more_than")  # the default
PRETRAIN_TYPES = ("describe",)
GROUNDING_TYPES = ("locate_largest",)  # a box as the answer (rewards.grounding_iou); not asked by default
BACKGROUND = {"in_domain": (245, 245, 245), "ood": (35, 35, 40)}

TEMPLATES = {
    "in_domain": {
        "count_all": "How many shapes are in the image?",
        "count_colour": "How many {colour} shapes are in the image?",
        "count_shape": "How many {shape}s are in the image?",
        "largest_colour": "What is the colour of the largest shape?",
        "more_than": "How many more {colour} shapes than {colour2} shapes are there?",
        "describe": "What shapes are in the image? Name each by colour and shape, largest first.",
        "locate_largest": "Where is the largest shape? Answer with its box [x1, y1, x2, y2] in pixels.",
    },
    "ood": {
        "count_all": "Count every object drawn in the picture. What is the total?",
        "count_colour": "In this picture, what is the number of objects coloured {colour}?",
        "count_shape": "Tell me the number of {shape} objects in this picture.",
        "largest_colour": "Which colour does the biggest object in the picture have?",
        "more_than": "By how much does the number of {colour} objects exceed the number of {colour2} ones?",
        "describe": "List every object in this picture by colour and shape, the biggest one first.",
        "locate_largest": "Give the bounding box [x1, y1, x2, y2] of the biggest object, in pixels.",
    },
}
SPLITS = {"train": "in_domain", "val": "in_domain", "ood": "ood"}
SPLIT_SEED_OFFSET = {"train": 0, "val": 1_000_003, "ood": 2_000_029}


@dataclass
class Shape:
    kind: str
    colour: str
    cx: float
    cy: float
    size: float  # half-width of the bounding box, pixels

    def bbox(self):
        return (self.cx - self.size, self.cy - self.size, self.cx + self.size, self.cy + self.size)


def _overlaps(a: Shape, b: Shape, gap: float) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox()
    bx0, by0, bx1, by1 = b.bbox()
    return not (ax1 + gap < bx0 or bx1 + gap < ax0 or ay1 + gap < by0 or by1 + gap < ay0)


SIZE_RANGE = (0.07, 0.16)  # half-width of a shape as a fraction of the image side, in domain
OOD_SIZE_SCALE = 0.7  # out of domain, shapes are smaller


def sample_scene(rng: random.Random, *, image_size: int, domain: str, max_shapes: int = 6,
                 size_range: tuple[float, float] = SIZE_RANGE) -> list[Shape]:
    """Non-overlapping shapes; the largest is at least 25% larger than any other (a unique answer)."""
    lo, hi = size_range if domain == "in_domain" else (size_range[0] * OOD_SIZE_SCALE, size_range[1] * OOD_SIZE_SCALE)
    n = rng.randint(1, max_shapes)  # drawn once: retrying with a new n would favour small counts
    for _ in range(1000):
        shapes: list[Shape] = []
        for _ in range(n):
            for _ in range(200):
                size = rng.uniform(lo, hi) * image_size
                s = Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.uniform(size + 1, image_size - size - 1),
                          rng.uniform(size + 1, image_size - size - 1), size)
                if not any(_overlaps(s, o, gap=2.0) for o in shapes):
                    shapes.append(s)
                    break
        sizes = sorted((s.size for s in shapes), reverse=True)
        if len(shapes) == n and (n == 1 or sizes[0] >= 1.25 * sizes[1]):
            return shapes
    raise RuntimeError("could not place the shapes; lower max_shapes or raise image_size")


def render(shapes: list[Shape], *, image_size: int, domain: str) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), BACKGROUND[domain])
    draw = ImageDraw.Draw(img)
    for s in shapes:
        colour = COLOURS[s.colour]
        x0, y0, x1, y1 = s.bbox()
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([(s.cx, y0), (x1, y1), (x0, y1)], fill=colour)
    return img


def _count_negatives(rng: random.Random, truth: int, k: int = 3) -> list[str]:
    """Plausible wrong counts: close to the truth, never negative, never the truth."""
    pool = [truth + d for d in (-2, -1, 1, 2, 3) if truth + d >= 0]
    rng.shuffle(pool)
    return [str(x) for x in sorted(pool[:k], key=lambda x: abs(x - truth))]


def make_question(rng: random.Random, shapes: list[Shape], qtype: str, domain: str) -> dict:
    t = TEMPLATES[domain][qtype]
    colours = [s.colour for s in shapes]
    choices = None
    if qtype == "describe":  # the scene in words; the wrong ones change one shape's colour
        listed = _listing(shapes)
        negatives = []
        for i in rng.sample(range(len(listed)), min(3, len(listed))):
            colour, kind = listed[i]
            wrong = list(listed)
            wrong[i] = (rng.choice([c for c in COLOURS if c != colour]), kind)
            negatives.append(", ".join(f"{c} {k}" for c, k in wrong))
        return {"problem": "<image>" + t, "answer": ", ".join(f"{c} {k}" for c, k in listed), "choices": None,
                "negatives": negatives}
    if qtype == "locate_largest":  # grounding: the box, rounded to pixels; the wrong ones shifted or resized
        x0, y0, x1, y1 = (round(v) for v in max(shapes, key=lambda s: s.size).bbox())
        d = max(2, (x1 - x0) // 2)
        moved = [(x0 + d, y0, x1 + d, y1), (x0, y0 - d, x1, y1 - d), (x0 + d, y0 + d, x1 - d // 2, y1 - d // 2)]
        return {"problem": "<image>" + t, "answer": _box_text((x0, y0, x1, y1)), "choices": None,
                "negatives": [_box_text(b) for b in moved]}
    if qtype == "count_all":
        q, truth = t, len(shapes)
    elif qtype == "count_colour":
        c = rng.choice(list(COLOURS))
        q, truth = t.format(colour=c), colours.count(c)
    elif qtype == "count_shape":
        k = rng.choice(SHAPES)
        q, truth = t.format(shape=k), sum(s.kind == k for s in shapes)
    elif qtype == "more_than":
        # the most frequent colour, ties broken by name (never by set order: it varies per process)
        c, c2 = min(set(colours), key=lambda x: (-colours.count(x), x)), rng.choice(list(COLOURS))
        if colours.count(c2) > colours.count(c) or c2 == c:
            c2 = min((x for x in COLOURS if x != c), key=lambda x: (colours.count(x), x))
        q, truth = t.format(colour=c, colour2=c2), colours.count(c) - colours.count(c2)
    else:  # largest_colour: multiple choice over the four colours
        largest = max(shapes, key=lambda s: s.size)
        choices = list(COLOURS)
        q = t + " Choices: " + ", ".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices)) + "."
        answer = largest.colour
        negatives = [c for c in choices if c != answer]
        rng.shuffle(negatives)
        return {"problem": "<image>" + q, "answer": answer, "choices": choices, "negatives": negatives}
    return {"problem": "<image>" + q, "answer": str(truth), "choices": None, "negatives": _count_negatives(rng, truth)}


def _box_text(box) -> str:
    return "[" + ", ".join(str(int(v)) for v in box) + "]"


def _listing(shapes: list[Shape]) -> list[tuple[str, str]]:
    return [(s.colour, s.kind) for s in sorted(shapes, key=lambda s: -s.size)]


def describe(shapes: list[Shape]) -> str:
    """The scene in words, largest shape first: the reasoning of an SFT target (every word of it is
    read off the image, so SFT teaches perception densely, not through one answer token)."""
    return "I see " + ", ".join(f"{c} {k}" for c, k in _listing(shapes)) + "."


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def generate(split: str, n: int, *, seed: int = 0, image_size: int = 84,
             question_types=QUESTION_TYPES, max_shapes: int = 6, size_range=SIZE_RANGE) -> list[dict]:
    """n examples of a split, in the Geometry3K row format (+ question_type, negatives, scene, id).

    `images` is a list with one {"bytes": PNG, "path": name} entry, as the hub datasets store it.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    domain = SPLITS[split]
    rng = random.Random(seed + SPLIT_SEED_OFFSET[split])
    rows = []
    for i in range(n):
        shapes = sample_scene(rng, image_size=image_size, domain=domain, max_shapes=max_shapes,
                              size_range=tuple(size_range))
        qtype = question_types[i % len(question_types)]
        row = make_question(rng, shapes, qtype, domain)
        name = f"{split}_{i:06d}.png"
        row.update(id=f"{split}-{i}", question_type=qtype, domain=domain,
                   images=[{"bytes": _png(render(shapes, image_size=image_size, domain=domain)), "path": name}],
                   scene=json.dumps([asdict(s) for s in shapes]), reasoning=describe(shapes))
        rows.append(row)
    return rows


def write_parquet(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")  # unique: concurrent writers never share one
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)  # atomic: a killed run never leaves a half-written split
    return path


def check_options(question_types, max_shapes, size_range) -> None:
    """The task options, each error naming its option (build_task and the config both check here)."""
    known = QUESTION_TYPES + PRETRAIN_TYPES + GROUNDING_TYPES
    unknown = set(question_types) - set(known)
    if unknown or not question_types:
        raise ValueError(f"question_types: {sorted(unknown) or 'empty'}; choose from {list(known)}")
    lo_hi = list(size_range)
    if len(lo_hi) != 2 or not all(isinstance(x, (int, float)) for x in lo_hi) or not 0 < lo_hi[0] <= lo_hi[1] < 0.5:
        raise ValueError(f"size_range: must be [lo, hi] with 0 < lo <= hi < 0.5, got {lo_hi}")
    if not 1 <= max_shapes <= 12:
        raise ValueError(f"max_shapes: must be in [1, 12], got {max_shapes}")


def build_task(out_dir, *, sizes=None, seed: int = 0, image_size: int = 84, question_types=QUESTION_TYPES,
               max_shapes: int = 6, size_range=SIZE_RANGE) -> dict[str, Path]:
    """Write train/val/ood parquet files under out_dir; returns {split: path}."""
    sizes = sizes or {"train": 2000, "val": 200, "ood": 200}
    check_options(question_types, max_shapes, size_range)
    out = Path(out_dir)
    kw = dict(seed=seed, image_size=image_size, question_types=tuple(question_types), max_shapes=max_shapes,
              size_range=size_range)
    return {split: write_parquet(generate(split, n, **kw), out / f"{split}.parquet") for split, n in sizes.items()}


def corpus() -> list[str]:
    """Text the tiny models' tokenizer is trained on: every template, word and answer of the task."""
    from .prompts import DEFAULT_REASONING, INSTRUCTION

    words = [INSTRUCTION, f"<think>{DEFAULT_REASONING}</think>", "<think>", "</think>", "\\boxed{}", "user",
             "assistant", "Choices:", "(A) (B) (C) (D)"]
    for domain in TEMPLATES.values():  # the grounding templates are left out: the tiny tokenizer stays as it was
        for t in (t for q, t in domain.items() if q not in GROUNDING_TYPES):
            for c in COLOURS:
                for k in SHAPES:
                    words.append(t.format(colour=c, colour2=c, shape=k))
    words += [f"<think>There are {i} {c} {k}s.</think> \\boxed{{{i}}}" for i in range(12) for c in COLOURS
              for k in SHAPES]
    words += [f"<think>The largest shape is {c}.</think> \\boxed{{{c}}}" for c in COLOURS]
    words += [f"<think>I see {c} {k}, {c} {k}.</think>" for c in COLOURS for k in SHAPES]
    return words
