"""Readers on small files in both published formats, malformed rows named; the synthetic task
re-derived independently from its pixels; collation."""

import io
import json
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

from vlmfast.data import RowError, read_geometry3k, read_mathvista, read_preference_pairs
from vlmfast.data.synthetic import BACKGROUND, COLOURS, TEMPLATES, build_task, generate, write_parquet


def _png(colour=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), colour).save(buf, format="PNG")
    return buf.getvalue()


# --- readers ---------------------------------------------------------------------------------------


def test_geometry3k_parquet_and_jsonl_with_image_files(tmp_path):
    rows = generate("train", 4, seed=3)
    write_parquet(rows, tmp_path / "g.parquet")
    ex = read_geometry3k(tmp_path / "g.parquet")
    assert len(ex) == 4 and ex[0].problem.startswith("<image>") and ex[0].images[0].size == (84, 84)
    assert ex[0].answer == rows[0]["answer"] and ex[0].negatives == rows[0]["negatives"]
    # jsonl + image files next to it (paths relative to the file, or in images/)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(_png())
    lines = [{"images": ["a.png"], "problem": "<image>Find x.", "answer": "5", "choices": ["3", "5"]},
             {"images": ["a.png"], "problem": "No marker here.", "answer": "\\frac{1}{2}"}]
    (tmp_path / "g.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    ex = read_geometry3k(tmp_path / "g.jsonl")
    assert ex[0].choices == ["3", "5"] and ex[1].problem == "<image>No marker here."
    assert np.asarray(ex[0].images[0])[0, 0].tolist() == [200, 10, 10]


@pytest.mark.parametrize(
    "row,match",
    [
        ({"images": ["missing.png"], "problem": "<image>q", "answer": "1", "id": "r7"}, r"row 0 \(id=r7\).*not found"),
        ({"images": [], "problem": "<image>q", "answer": "1"}, "row 0: missing image"),
        ({"images": ["a.png"], "problem": "<image>q"}, "missing column 'answer'"),
        ({"images": ["a.png"], "problem": "<image>q", "answer": " "}, "empty answer"),
        ({"images": ["a.png"], "problem": "<image><image>q", "answer": "1"}, "2 <image> markers for 1 images"),
        ({"images": ["text.png"], "problem": "<image>q", "answer": "1"}, r"row 0: image 'text.png' is not a readable"),
        ({"images": [5], "problem": "<image>q", "answer": "1"}, r"row 0: an image is a file path, bytes .*got 5"),
    ],
)
def test_geometry3k_malformed_rows_are_named(tmp_path, row, match):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "text.png").write_text("not a picture")
    (tmp_path / "bad.jsonl").write_text(json.dumps(row))
    with pytest.raises(RowError, match=match):
        read_geometry3k(tmp_path / "bad.jsonl")


def test_mathvista_format(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(_png())
    rows = [
        {"pid": "1", "question": "What is x?", "image": "images/1.png", "decoded_image": None, "choices": None,
         "answer": "12", "question_type": "free_form", "answer_type": "integer", "unit": "cm"},
        {"pid": "2", "question": "Which?", "image": None, "decoded_image": {"bytes": _png(), "path": None},
         "choices": ["a", "b"], "answer": "b", "question_type": "multi_choice", "answer_type": "text", "unit": None},
    ]
    write_parquet(rows, tmp_path / "mv.parquet")  # as published: decoded images embedded in parquet
    ex = read_mathvista(tmp_path / "mv.parquet")
    assert [e.id for e in ex] == ["1", "2"] and ex[0].problem == "<image>What is x?"
    assert ex[0].meta["answer_type"] == "integer" and ex[0].meta["unit"] == "cm" and ex[1].choices == ["a", "b"]
    # a multiple-choice question shows its options (MathVista keeps them apart from the question, in `choices`)
    assert ex[1].problem == "<image>Which?\nChoices:\n(A) a\n(B) b"


def test_mathvista_questions_with_their_own_markers_or_options_are_kept(tmp_path):
    (tmp_path / "1.png").write_bytes(_png())
    rows = [{"pid": "1", "question": "<image>\nWhat is x?", "image": "1.png", "answer": "3"},  # LLaVA style
            {"pid": "2", "question": "Which? (A) a (B) b", "image": "1.png", "choices": ["a", "b"], "answer": "b",
             "question_type": "multi_choice"}]
    (tmp_path / "mv.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ex = read_mathvista(tmp_path / "mv.jsonl")
    assert ex[0].problem == "<image>\nWhat is x?"  # one marker for its one image, not two
    assert ex[1].problem == "<image>Which? (A) a (B) b"


@pytest.mark.parametrize("negatives, want", [(["12", "18"], ["12", "18"]), ('["12", "18"]', ["12", "18"]),
                                             ("12", ["12"]), (None, [])])
def test_negatives_as_a_list_a_json_list_or_one_string(tmp_path, negatives, want):
    (tmp_path / "a.png").write_bytes(_png())
    row = {"images": ["a.png"], "problem": "q", "answer": "15", "negatives": negatives}
    (tmp_path / "g.jsonl").write_text(json.dumps(row))
    assert read_geometry3k(tmp_path / "g.jsonl")[0].negatives == want


@pytest.mark.parametrize("reader, row", [
    (read_mathvista, {"pid": "1", "question": "<image><image>x?", "image": "a.png", "answer": "1"}),
    (read_preference_pairs, {"prompt": "<image><image>x?", "image": "a.png", "chosen": "a", "rejected": "b"}),
])
def test_markers_that_miss_the_images_are_named_in_every_reader(tmp_path, reader, row):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "bad.jsonl").write_text(json.dumps(row))
    with pytest.raises(RowError, match=r"row 0.*2 <image> markers for 1 images"):
        reader(tmp_path / "bad.jsonl")


@pytest.mark.parametrize(
    "override,match",
    [
        ({"answer": "twelve"}, r"row 0 \(id=1\): answer 'twelve' is not of answer_type 'integer'"),
        ({"image": "images/none.png"}, "not found"),
        ({"question_type": "essay"}, "unknown question_type"),
        ({"question_type": "multi_choice"}, "multi_choice question without choices"),
    ],
)
def test_mathvista_malformed_rows_are_named(tmp_path, override, match):
    row = {"pid": "1", "question": "x?", "image": "1.png", "answer": "12", "question_type": "free_form",
           "answer_type": "integer"}
    (tmp_path / "1.png").write_bytes(_png())
    (tmp_path / "mv.jsonl").write_text(json.dumps({**row, **override}))
    with pytest.raises(RowError, match=match):
        read_mathvista(tmp_path / "mv.jsonl")


def test_preference_pairs(tmp_path):
    (tmp_path / "img.png").write_bytes(_png())
    write_parquet([{"prompt": "How many?", "image": {"bytes": _png(), "path": None}, "chosen": "\\boxed{3}",
                    "rejected": "\\boxed{4}"}], tmp_path / "p.parquet")
    (pair,) = read_preference_pairs(tmp_path / "p.parquet")
    assert pair.prompt == "<image>How many?" and pair.chosen == "\\boxed{3}" and len(pair.images) == 1
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "image": "img.png", "chosen": "a"}))
    with pytest.raises(RowError, match="missing text column 'rejected'"):
        read_preference_pairs(tmp_path / "bad.jsonl")


def test_unknown_file_type_and_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(RowError, match="unsupported file type"):
        read_geometry3k(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError):
        read_geometry3k(tmp_path / "nothing-here")


def test_files_that_are_not_rows_are_named_by_file_and_line(tmp_path):
    good = json.dumps({"images": ["a.png"], "problem": "<image>q", "answer": "1"})
    (tmp_path / "broken.jsonl").write_text(good + "\n{not json\n")
    with pytest.raises(RowError, match=r"broken.jsonl line 2: not a JSON object"):
        read_geometry3k(tmp_path / "broken.jsonl")
    (tmp_path / "list.jsonl").write_text(good + "\n[1, 2]\n")
    with pytest.raises(RowError, match=r"list.jsonl row 1: a row is an object of columns, got list"):
        read_geometry3k(tmp_path / "list.jsonl")
    (tmp_path / "torn.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(RowError, match=r"torn.parquet: not a readable parquet file"):
        read_geometry3k(tmp_path / "torn.parquet")


def test_bad_data_exits_2_naming_the_line_before_the_run_starts(tmp_path, capsys):
    from vlmfast.train import main

    (tmp_path / "train.jsonl").write_text("{not json\n")
    (tmp_path / "empty.jsonl").write_text("")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run: {{name: r, out_dir: {tmp_path / 'runs'}}}\nmodel: {{path: 'tiny:student'}}\n"
                      f"data: {{train: {tmp_path / 'train.jsonl'}}}\nstages: [{{type: sft, steps: 1}}]\n")
    assert main(["--config", str(recipe)]) == 2
    assert "data error: " in (err := capsys.readouterr().err) and "train.jsonl line 1: not a JSON object" in err
    assert main(["--config", str(recipe), f"data.train={tmp_path / 'empty.jsonl'}"]) == 2
    assert "data split 'train'" in capsys.readouterr().err and not (tmp_path / "runs" / "r").exists()


# --- the synthetic task ---------------------------------------------------------------------------


def _blobs(img: Image.Image, background) -> list[tuple[str, int]]:
    """(colour name, pixel area) of every connected blob of a task colour: an independent reading
    of the picture (4-connected flood fill; antialiasing-free Pillow shapes are exact colours)."""
    a = np.asarray(img)
    names = np.full(a.shape[:2], "", dtype=object)
    for name, rgb in COLOURS.items():
        names[(a == rgb).all(-1)] = name
    seen = np.zeros(a.shape[:2], bool)
    out = []
    for y, x in zip(*np.nonzero(names != "")):
        if seen[y, x]:
            continue
        colour, area, q = names[y, x], 0, deque([(y, x)])
        seen[y, x] = True
        while q:
            cy, cx = q.popleft()
            area += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < a.shape[0] and 0 <= nx < a.shape[1] and not seen[ny, nx] and names[ny, nx] == colour:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        if area >= 4:
            out.append((colour, area))
    return out


@pytest.mark.parametrize("split", ["train", "ood"])
def test_answers_match_an_independent_reading_of_the_image(split):
    rows = generate(split, 60, seed=11)
    checked = 0
    for r in rows:
        img = Image.open(io.BytesIO(r["images"][0]["bytes"])).convert("RGB")
        blobs = _blobs(img, BACKGROUND[r["domain"]])
        scene = json.loads(r["scene"])
        assert len(blobs) == len(scene)  # shapes never overlap: one blob each
        counts = {c: sum(b[0] == c for b in blobs) for c in COLOURS}
        q, qt = r["problem"], r["question_type"]
        if qt == "count_all":
            assert r["answer"] == str(len(blobs))
        elif qt == "count_colour":
            colour = next(c for c in COLOURS if f" {c} " in q or f"coloured {c}?" in q)
            assert r["answer"] == str(counts[colour])
        elif qt == "largest_colour":
            assert r["answer"] == max(blobs, key=lambda b: b[1])[0] and r["choices"] == list(COLOURS)
        elif qt == "more_than":
            c1, c2 = [c for c in sorted(COLOURS, key=q.find) if c in q][:2]
            assert r["answer"] == str(counts[c1] - counts[c2]) and int(r["answer"]) >= 0
        else:  # count_shape: the kind is not in the pixels' colours; count from the scene record
            kind = next(k for k in ("circle", "square", "triangle") if k in q)
            assert r["answer"] == str(sum(s["kind"] == kind for s in scene))
        assert r["answer"] not in r["negatives"] and len(r["negatives"]) >= 2
        checked += 1
    assert checked == 60


def test_grounding_boxes_match_the_pixels_and_the_iou_reward_grades_them():
    """locate_largest: the answer box is the largest blob's extent read off the pixels (within a pixel of
    rounding); grounding_iou gives the gold box 1 and its shifted negatives less."""
    from vlmfast.rewards import _box, box_iou, grounding_iou

    rows = generate("train", 12, seed=5, question_types=("locate_largest",))
    for r in rows:
        a = np.asarray(Image.open(io.BytesIO(r["images"][0]["bytes"])).convert("RGB"))
        fg = (a != BACKGROUND["in_domain"]).any(-1)
        ys, xs = np.nonzero(fg)
        scene = json.loads(r["scene"])
        big = max(scene, key=lambda s: s["size"])  # its pixels: the blob inside its own box
        inside = (abs(xs - big["cx"]) <= big["size"] + 1) & (abs(ys - big["cy"]) <= big["size"] + 1)
        seen = (xs[inside].min(), ys[inside].min(), xs[inside].max(), ys[inside].max())
        assert all(abs(p - g) <= 1.5 for p, g in zip(seen, _box(r["answer"]))), (seen, r["answer"])
        answers = [f"<think>t</think> \\boxed{{{x}}}" for x in [r["answer"], *r["negatives"]]]
        iou = grounding_iou(answers, [r["answer"]] * len(answers))
        assert iou[0] == 1.0 and all(v < 1.0 for v in iou[1:])
        assert box_iou(_box(r["answer"]), _box(r["negatives"][0])) < 1


def test_deterministic_across_processes():
    """Same seed, same bytes, in processes with different string-hash seeds (no set-order leaks)."""
    import hashlib
    import os
    import subprocess
    import sys

    code = ("import hashlib; from vlmfast.data.synthetic import generate; "
            "print(hashlib.md5(repr(generate('train', 40, seed=3)).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=dict(os.environ, PYTHONHASHSEED=str(h))).stdout.strip() for h in (1, 2, 3)}
    assert len(digests) == 1
    assert digests == {hashlib.md5(repr(generate("train", 40, seed=3)).encode()).hexdigest()}


def test_deterministic_and_splits_differ():
    a, b = generate("train", 8, seed=5), generate("train", 8, seed=5)
    assert a == b
    assert generate("train", 8, seed=6) != a
    assert generate("val", 8, seed=5)[0]["images"][0]["bytes"] != a[0]["images"][0]["bytes"]


def test_ood_split_shifts_appearance_and_phrasing():
    ind, ood = generate("val", 40, seed=0), generate("ood", 40, seed=0)
    corner = lambda r: np.asarray(Image.open(io.BytesIO(r["images"][0]["bytes"])).convert("RGB"))[0, 0].tolist()
    assert all(corner(r) == list(BACKGROUND["in_domain"]) for r in ind)
    assert all(corner(r) == list(BACKGROUND["ood"]) for r in ood)
    in_stems = {t.split("{")[0] for t in TEMPLATES["in_domain"].values()}
    assert not any(r["problem"].removeprefix("<image>").startswith(tuple(in_stems)) for r in ood)
    mean_size = lambda rows: np.mean([s["size"] for r in rows for s in json.loads(r["scene"])])
    assert mean_size(ood) < 0.8 * mean_size(ind)


def test_build_task_writes_readable_splits(tmp_path):
    paths = build_task(tmp_path, sizes={"train": 10, "val": 4, "ood": 4}, seed=1)
    assert set(paths) == {"train", "val", "ood"}
    assert len(read_geometry3k(paths["ood"])) == 4
    assert not list(tmp_path.glob("*.tmp"))


def _saved_dataset(tmp_path, rows):
    """The rows as a `datasets` table with a real image column (a list of images per row), saved to disk."""
    import datasets

    features = datasets.Features({"images": datasets.Sequence(datasets.Image()), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"images": [[{"bytes": im["bytes"], "path": None} for im in r["images"]]
                                                   for r in rows],
                                        "problem": [r["problem"] for r in rows],
                                        "answer": [r["answer"] for r in rows]}, features=features)
    table.save_to_disk(str(tmp_path / "saved"))
    return table, tmp_path / "saved"


def test_a_datasets_table_is_read_lazily(tmp_path, monkeypatch):
    """A `save_to_disk` folder (and a hub name, through load_dataset) reads as the parquet file does, but no
    image is decoded until it is used; an image in use is the same object on every access."""
    import datasets

    from vlmfast.data import formats

    rows = generate("train", 5, seed=4)
    write_parquet(rows, tmp_path / "g.parquet")
    eager = read_geometry3k(tmp_path / "g.parquet")
    _, folder = _saved_dataset(tmp_path, rows)
    decoded = []
    real = formats._image
    monkeypatch.setattr(formats, "_image", lambda *a: decoded.append(1) or real(*a))
    lazy = read_geometry3k(folder)
    assert decoded == []  # reading decoded nothing
    assert isinstance(lazy[0].images, formats.LazyImages) and len(lazy[0].images) == 1
    held = [b.images[0] for b in lazy]
    for a, b, img in zip(eager, lazy, held):
        assert (a.problem, a.answer) == (b.problem, b.answer)
        assert np.array_equal(np.asarray(a.images[0]), np.asarray(img))
    assert len(decoded) == 5
    assert lazy[0].images[0] is held[0] and len(decoded) == 5  # in use: not decoded again
    from vlmfast.data.collate import collate
    from vlmfast.data.synthetic import corpus
    from vlmfast.models import build_processor, build_tokenizer

    proc = build_processor(build_tokenizer(corpus()))
    batches = [collate(proc, [e.problem for e in exs], [e.images for e in exs], ["\\boxed{1}"] * 5)
               for exs in (eager, lazy)]
    assert all(torch.equal(batches[0][k], batches[1][k]) for k in batches[0])  # the same batch, lazily
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return datasets.load_from_disk(str(folder))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    (first, *_) = read_geometry3k("hiyouga/geometry3k:test")
    assert calls == [("hiyouga/geometry3k", "test")] and first.answer == rows[0]["answer"]


def test_a_datasets_row_without_its_image_is_named(tmp_path):
    import datasets

    features = datasets.Features({"images": datasets.Sequence(datasets.Image()), "problem": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"images": [[{"bytes": _png(), "path": None}], []], "problem": ["q", "q"],
                                        "answer": ["1", "2"]}, features=features)
    table.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(RowError, match=r"bad row 1: missing image"):
        read_geometry3k(tmp_path / "bad")


def test_each_split_is_read_in_its_own_format(tmp_path):
    """Train on a Geometry3K-format file and evaluate on a MathVista-format one (data.split_formats); a format for a
    split the recipe does not have, or an unknown format, is a config error naming the key."""
    from vlmfast.config import ConfigError, load_config
    from vlmfast.data.loading import load_data

    write_parquet(generate("train", 4, seed=3), tmp_path / "g.parquet")
    (tmp_path / "1.png").write_bytes(_png())
    mv = {"pid": "7", "question": "Which?", "image": "1.png", "choices": ["a", "b"], "answer": "b",
          "question_type": "multi_choice", "answer_type": "text"}
    (tmp_path / "mv.jsonl").write_text(json.dumps(mv))
    data = {"synthetic": None, "train": str(tmp_path / "g.parquet"), "val": str(tmp_path / "g.parquet"),
            "eval_splits": {"mathvista": str(tmp_path / "mv.jsonl")}}
    cfg = load_config(raw={"data": {**data, "split_formats": {"mathvista": "mathvista"}}, "stages": [{"type": "sft"}]})
    loaded = load_data(cfg)
    assert len(loaded["train"]) == 4 and loaded["mathvista"][0].id == "7"
    assert loaded["mathvista"][0].problem.endswith("(A) a\n(B) b") and loaded["mathvista"][0].question_type
    with pytest.raises(ConfigError, match=r"data.split_formats.ood: no such split"):
        load_config(raw={"data": {**data, "split_formats": {"ood": "mathvista"}}, "stages": [{"type": "sft"}]})
    with pytest.raises(ConfigError, match=r"data.split_formats.mathvista: must be one of"):
        load_config(raw={"data": {**data, "split_formats": {"mathvista": "coco"}}, "stages": [{"type": "sft"}]})


def test_text_only_rows_are_refused_unless_allowed_and_train_beside_image_rows(tmp_path):
    """A row without images: a missing image (a wrong column name must not silently train text-only) unless
    data.text_only_rows; then a text-only problem, in a batch beside image rows and in micro-batches of its own
    (no empty image inputs reach the vision tower), through SFT and a GRPO rollout on the HF engine."""
    from vlmfast.config import load_config
    from vlmfast.train import run

    (tmp_path / "a.png").write_bytes(_png())
    rows = [{"images": ["a.png"], "problem": "<image>What colour is the square?", "answer": "red"},
            {"problem": "What is 2 + 3?", "answer": "5"},
            {"images": [], "problem": "What is 4 - 1?", "answer": "3"},
            {"images": None, "problem": "What is 2 x 2?", "answer": "4"}]
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(RowError, match=r"row 1: missing column 'images'"):
        read_geometry3k(tmp_path / "mixed.jsonl")
    with pytest.raises(RowError, match=r"row 1: missing image \(a text-only row\? set data.text_only_rows: true\)"):
        read_geometry3k(_without_row(tmp_path, rows, 1))  # its row 1: `images: []`
    ex = read_geometry3k(tmp_path / "mixed.jsonl", text_only=True)
    assert [len(e.images) for e in ex] == [1, 0, 0, 0] and ex[1].problem == "What is 2 + 3?"
    raw = {"run": {"name": "t", "out_dir": str(tmp_path / "runs"), "threads": 2, "checkpoint_every": 100},
           "model": {"path": "tiny:student"},
           "data": {"train": str(tmp_path / "mixed.jsonl"), "val": str(tmp_path / "mixed.jsonl"),
                    "text_only_rows": True},
           "eval": {"every": 100, "num_problems": 4, "n_samples": 2, "k": [1], "max_new_tokens": 4, "probes": 2},
           "stages": [{"type": "sft", "name": "sft", "steps": 1, "lr": 1e-3, "batch_size": 4, "micro_batch_size": 1},
                      {"type": "grpo", "name": "grpo", "steps": 1, "lr": 1e-3, "batch_size": 4, "group_size": 2,
                       "max_new_tokens": 4, "micro_batch_size": 2}]}
    run(load_config(raw=raw))
    recs = [json.loads(x) for x in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["kind"]) for r in recs if r["kind"] == "train"] == [("sft", "train"), ("grpo", "train")]
    assert all(np.isfinite(r["loss"]) for r in recs if r["kind"] == "train")


def _without_row(tmp_path, rows, k):
    path = tmp_path / "some.jsonl"
    path.write_text("\n".join(json.dumps(r) for i, r in enumerate(rows) if i != k))
    return path
