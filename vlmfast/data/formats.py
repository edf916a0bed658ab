"""Dataset readers: the published Geometry3K and MathVista formats and preference pairs, from local
parquet or jsonl (+ image files), or through the `datasets` library when it is installed: a hub name
(`hiyouga/geometry3k`, `name:split`) or a folder written by `Dataset.save_to_disk`. A `datasets` source stays
in its memory-mapped Arrow table: each image is decoded when it is used (`LazyImages`), never the whole
split at once.

Every reader returns a list of `Example`; a malformed row (missing image, missing answer, an answer
that does not match its declared type) raises a ValueError that names the file and the row.
"""

from __future__ import annotations

import io
import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

IMAGE_MARKER = "<image>"


@dataclass
class Example:
    id: str
    problem: str  # the question text, with one IMAGE_MARKER per image
    images: list  # PIL images
    answer: str
    choices: list[str] | None = None
    question_type: str | None = None
    negatives: list[str] = field(default_factory=list)  # plausible wrong answers, if the data has them
    meta: dict = field(default_factory=dict)


@dataclass
class PreferencePair:
    id: str
    prompt: str
    images: list
    chosen: str
    rejected: str


class RowError(ValueError):
    pass


class _Stored:
    """An image column's entry left in a `datasets` table (undecoded): fetched and decoded on use."""

    def __init__(self, table, row: int, column: str, count: int):
        self.table, self.row, self.column, self.count = table, row, column, count

    def fetch(self) -> list:
        value = self.table[self.row][self.column]
        return list(value) if isinstance(value, (list, tuple)) else [value]


class LazyImages(Sequence):
    """An example's images from a `datasets` table, decoded when used. While an image is in use (held by
    a batch, or by the processor's feature cache) the same PIL object is returned, so caches keyed on it
    hit; once nothing holds it, it is freed and decoded again on the next use."""

    def __init__(self, stored: _Stored, where: str):
        self.stored, self.where = stored, where
        self.refs: list = [None] * stored.count

    def __len__(self) -> int:
        return self.stored.count

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        k %= len(self)
        img = self.refs[k]() if self.refs[k] is not None else None
        if img is None:
            img = _image(self.stored.fetch()[k], Path("."), self.where)
            self.refs[k] = weakref.ref(img)
        return img


def _image_columns(features) -> list[str]:
    from datasets import Image as ImageFeature

    def is_image(f):
        inner = getattr(f, "feature", None)
        return isinstance(f, ImageFeature) or (inner is not None and is_image(inner)) or \
            (isinstance(f, list) and len(f) == 1 and is_image(f[0]))

    return [name for name, f in features.items() if is_image(f)]


def _datasets_rows(source: str) -> list[dict]:
    """Rows of a hub dataset (`name` or `name:split`) or a `save_to_disk` folder: text columns as values, image
    columns as `_Stored` entries (their count checked now, their pixels decoded only when used)."""
    try:
        import datasets
    except ImportError as e:
        raise FileNotFoundError(f"{source}: no such file, and the `datasets` library is not installed to "
                                "load it as a hub dataset (pip install datasets)") from e
    name, _, split = str(source).partition(":")
    if Path(name).is_dir():
        table = datasets.load_from_disk(name)
        if isinstance(table, datasets.DatasetDict):
            table = table[split or "train"]
    else:
        table = datasets.load_dataset(name, split=split or "train")
    images = _image_columns(table.features)
    for col in images:  # rows hand out the stored bytes, not decoded pixels
        feature = table.features[col]
        undecoded = datasets.Image(decode=False)
        table = table.cast_column(col, [undecoded] if isinstance(feature, list) else
                                  (datasets.Sequence(undecoded) if hasattr(feature, "feature") else undecoded))
    text = table.remove_columns(images).to_list() if images else table.to_list()
    for i, row in enumerate(text):
        for col in images:
            value = table[i][col]
            count = 0 if value is None else (len(value) if isinstance(value, (list, tuple)) else 1)
            row[col] = _Stored(table, i, col, count) if count else value  # None or []: named by the reader
    return text


def _rows(source) -> tuple[list[dict], Path]:
    """Rows of a parquet/jsonl file or a folder of them; a hub name or a `save_to_disk` folder goes through
    `datasets`."""
    p = Path(source.partition(":")[0] if isinstance(source, str) else source)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        return _datasets_rows(str(source)), p
    p = Path(source)
    if p.is_dir():
        files = sorted([*p.glob("*.parquet"), *p.glob("*.jsonl")])
        if not files:
            raise FileNotFoundError(f"{p}: no .parquet or .jsonl files")
        rows = []
        for f in files:
            rows += _rows(f)[0]
        return rows, p
    if p.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(p).to_pylist()
        except pyarrow.ArrowException as e:
            raise RowError(f"{p}: not a readable parquet file ({e})") from None
        return _objects(rows, p), p.parent
    if p.suffix in (".jsonl", ".json"):
        rows = []
        with p.open() as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise RowError(f"{p} line {n}: not a JSON object ({e.msg} at column {e.colno})") from None
        return _objects(rows, p), p.parent
    if p.exists():
        raise RowError(f"{p}: unsupported file type {p.suffix!r} (use .parquet or .jsonl)")
    return _datasets_rows(str(source)), Path(".")


def _objects(rows: list, path: Path) -> list[dict]:
    """The rows, each a mapping of columns (a JSON line holding a list or a number is refused, naming its row)."""
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RowError(f"{path} row {i}: a row is an object of columns, got {type(row).__name__}")
    return rows


def _image(entry, root: Path, where: str) -> Image.Image:
    """An image from {"bytes", "path"} (the hub's storage), raw bytes, a PIL image or a file path; one that cannot
    be decoded is refused naming its row."""
    try:
        return _decoded(entry, root, where)
    except RowError:
        raise
    except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError (an OSError), truncated files
        raise RowError(f"{where}: image {_short(entry)} is not a readable image ({e})") from None


def _short(entry) -> str:
    return repr(entry) if isinstance(entry, str) else f"({type(entry).__name__})"


def _decoded(entry, root: Path, where: str) -> Image.Image:
    if isinstance(entry, Image.Image):
        return entry.convert("RGB")
    if isinstance(entry, dict):
        if entry.get("bytes"):
            return Image.open(io.BytesIO(entry["bytes"])).convert("RGB")
        entry = entry.get("path")
    if isinstance(entry, (bytes, bytearray)):
        return Image.open(io.BytesIO(entry)).convert("RGB")
    if isinstance(entry, str) and entry:
        for candidate in (Path(entry), root / entry, root / "images" / entry):
            if candidate.is_file():
                return Image.open(candidate).convert("RGB")
        raise RowError(f"{where}: image {entry!r} not found (looked in {root} and {root / 'images'})")
    if entry is None or entry == "":
        raise RowError(f"{where}: missing image")
    raise RowError(f"{where}: an image is a file path, bytes or {{bytes, path}}, got {entry!r}")


def _images(value, root: Path, where: str, text_only: bool = False):
    """An example's images: PIL images (local files, bytes), or LazyImages (left in a `datasets` table); none for a
    row without one where `text_only` rows are allowed (data.text_only_rows), else a missing image named."""
    if isinstance(value, _Stored):
        return LazyImages(value, where)
    entries = value if isinstance(value, (list, tuple)) else ([] if value is None or value == "" else [value])
    if not entries and text_only:
        return []
    if not entries:
        raise RowError(f"{where}: missing image (a text-only row? set data.text_only_rows: true)")
    return [_image(e, root, where) for e in entries]


def _where(path, i, row) -> str:
    rid = row.get("id", row.get("pid"))
    return f"{path} row {i}" + (f" (id={rid})" if rid is not None else "")


def _choices(value, where, column: str = "choices") -> list[str] | None:
    """A list column (choices, negatives) as strings: a list, a JSON list in a string, or one string alone."""
    if value is None or (hasattr(value, "__len__") and len(value) == 0):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip().startswith("[") else [value]
        except json.JSONDecodeError as e:
            raise RowError(f"{where}: {column} is not a JSON list ({e.msg}): {value[:80]!r}") from None
    if not isinstance(value, (list, tuple)) and not hasattr(value, "tolist"):
        raise RowError(f"{where}: {column} must be a list, got {type(value).__name__}")
    return [str(c) for c in (value.tolist() if hasattr(value, "tolist") else value)]


def _with_markers(text: str, images: list, where: str) -> str:
    """`text` with an <image> marker per image: as given when it has any (placed by the dataset), else one per image
    in front; a count that does not match the images is refused, naming the row."""
    if IMAGE_MARKER not in text:
        text = IMAGE_MARKER * len(images) + text
    if text.count(IMAGE_MARKER) != len(images):
        raise RowError(f"{where}: {text.count(IMAGE_MARKER)} {IMAGE_MARKER} markers for {len(images)} images")
    return text


def _with_choices(question: str, choices: list[str]) -> str:
    """A multiple-choice question as MathVista's own query shows it: the options lettered after the question (a
    question that lists them already, "(A) ...", is kept as it is)."""
    if "(A)" in question:
        return question
    return question + "\nChoices:\n" + "\n".join(f"({chr(ord('A') + k)}) {c}" for k, c in enumerate(choices))


def read_geometry3k(source, text_only: bool = False) -> list[Example]:
    """Geometry3K as published: `images` (list), `problem` (with `<image>`), `answer`, optional
    `choices`. Extra columns (id, question_type, negatives, ...) are kept in `meta`. With `text_only`, a row without
    images (no column, null or empty) is a text-only problem."""
    rows, root = _rows(source)
    out = []
    for i, row in enumerate(rows):
        where = _where(source, i, row)
        for key in ("problem", "answer") if text_only else ("images", "problem", "answer"):
            if key not in row or row[key] is None:
                hint = " (a text-only row? set data.text_only_rows: true)" if key == "images" else ""
                raise RowError(f"{where}: missing column {key!r}{hint}")
        imgs = _images(row.get("images"), root, where, text_only)
        problem = _with_markers(str(row["problem"]), imgs, where)
        if str(row["answer"]).strip() == "":
            raise RowError(f"{where}: empty answer")
        meta = {k: v for k, v in row.items() if k not in ("images", "problem", "answer", "choices", "negatives")}
        out.append(Example(id=str(row.get("id", i)), problem=problem, images=imgs, answer=str(row["answer"]).strip(),
                           choices=_choices(row.get("choices"), where), question_type=row.get("question_type"),
                           negatives=_choices(row.get("negatives"), where, "negatives") or [], meta=meta))
    return out


_ANSWER_TYPES = {"integer": int, "float": float, "text": str, "list": None}


def read_mathvista(source, text_only: bool = False) -> list[Example]:
    """MathVista format: `question`, `image` (path) and/or `decoded_image`, `choices`, `answer`,
    `question_type` (multi_choice | free_form), `answer_type` (integer | float | text | list)."""
    rows, root = _rows(source)
    out = []
    for i, row in enumerate(rows):
        where = _where(source, i, row)
        for key in ("question", "answer"):
            if row.get(key) is None:
                raise RowError(f"{where}: missing column {key!r}")
        imgs = _images(row.get("decoded_image") or row.get("image"), root, where, text_only)
        qtype, atype = row.get("question_type", "free_form"), row.get("answer_type", "text")
        if qtype not in ("multi_choice", "free_form"):
            raise RowError(f"{where}: unknown question_type {qtype!r} (multi_choice or free_form)")
        if atype not in _ANSWER_TYPES:
            raise RowError(f"{where}: unknown answer_type {atype!r} ({', '.join(_ANSWER_TYPES)})")
        answer = str(row["answer"]).strip()
        cast = _ANSWER_TYPES[atype]
        if cast in (int, float):
            try:
                cast(answer)
            except ValueError:
                raise RowError(f"{where}: answer {answer!r} is not of answer_type {atype!r}") from None
        choices = _choices(row.get("choices"), where)
        if qtype == "multi_choice" and not choices:
            raise RowError(f"{where}: multi_choice question without choices")
        question = _with_choices(str(row["question"]), choices) if qtype == "multi_choice" else str(row["question"])
        out.append(Example(id=str(row.get("pid", row.get("id", i))), problem=_with_markers(question, imgs, where),
                           images=imgs, answer=answer, choices=choices, question_type=qtype,
                           meta={"answer_type": atype, **{k: v for k, v in row.items() if k in ("unit", "precision")}}))
    return out


def read_preference_pairs(source) -> list[PreferencePair]:
    """Preference pairs: `prompt` (with `<image>` markers or not), `image` or `images`, `chosen`, `rejected`."""
    rows, root = _rows(source)
    out = []
    for i, row in enumerate(rows):
        where = _where(source, i, row)
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise RowError(f"{where}: missing text column {key!r}")
        imgs = _images(row.get("images") or row.get("image"), root, where)
        prompt = _with_markers(row["prompt"], imgs, where)
        out.append(PreferencePair(id=str(row.get("id", i)), prompt=prompt, images=imgs, chosen=row["chosen"],
                                  rejected=row["rejected"]))
    return out
