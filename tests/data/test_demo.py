"""The demo mixture: determinism, well-formed records, sizes, held-out split, answers, cache."""

import concurrent.futures
import hashlib
import json
import multiprocessing
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightning_tive.data import demo
from lightning_tive.data.demo import (
    BACKGROUND,
    COLORS,
    DEFAULT_TRAIN_SIZES,
    DEMO_TASKS,
    OCR_ALPHABET,
    TASK_EVAL_KIND,
    DemoConfig,
    DemoPaths,
    ensure_demo,
    generate_demo,
)

SMALL = DemoConfig(seed=3, train_sizes={t: 12 for t in DEMO_TASKS}, val_size=5)


def folder_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory):
    """The default mixture, generated once for the module."""
    paths = generate_demo(tmp_path_factory.mktemp("demo"), DemoConfig())
    return paths, load(paths.train_json), load(paths.val_json)


def pixels(paths: DemoPaths, record: dict) -> np.ndarray:
    return np.asarray(Image.open(paths.image_folder / record["image"]).convert("RGB"))


def answer(record: dict) -> str:
    return record["conversations"][1]["value"]


def question(record: dict) -> str:
    return record["conversations"][0]["value"]


def shape_colors(img: np.ndarray) -> Counter:
    """Pixel counts of each named colour present (drawing is not antialiased, so colours are exact)."""
    flat = [tuple(int(v) for v in px) for px in img.reshape(-1, 3)]
    by_rgb = {rgb: name for name, rgb in COLORS.items()}
    return Counter(by_rgb[px] for px in flat if px in by_rgb)


def records_of(records: list[dict], task: str) -> list[dict]:
    return [r for r in records if r["task"] == task]


# ------------------------------------------------------------------ config and layout


def test_eval_kinds_follow_the_answers(default_demo):
    """Exact match where held-out answers are a word or two; token F1 where they are sentences."""
    _, _, val = default_demo
    for task in DEMO_TASKS:
        longest = max(len(answer(r).split()) for r in records_of(val, task))
        assert TASK_EVAL_KIND[task] == ("exact_match" if longest <= 2 else "token_f1"), (task, longest)
    assert TASK_EVAL_KIND[demo.ALIGN_TASK] == "token_f1"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_sizes": {"colour": 3}}, "unknown demo task(s) ['colour']"),
        ({"train_sizes": {"color": -1}}, "sizes must be >= 0"),
        ({"val_size": -2}, "sizes must be >= 0"),
        ({"image_size": 8}, "image_size must be >= 32"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError) as err:
        DemoConfig(**kwargs)
    assert message in str(err.value)


def test_generate_returns_standard_layout(tmp_path):
    paths = generate_demo(tmp_path, SMALL)
    assert paths == DemoPaths(tmp_path, tmp_path / "train.json", tmp_path / "val.json", tmp_path / "images")
    assert paths.train_json.is_file() and paths.val_json.is_file() and paths.image_folder.is_dir()


# ------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_bytes(tmp_path):
    config = DemoConfig(seed=7, train_sizes={t: 25 for t in DEMO_TASKS}, val_size=5)
    first = folder_digest(generate_demo(tmp_path / "a", config).root)
    second = folder_digest(generate_demo(tmp_path / "b", config).root)
    assert first == second
    assert len(first) == 2 + 30 * (len(DEMO_TASKS) - 1)  # two JSON files + one PNG per image record


def test_other_seed_gives_other_records(tmp_path):
    a = generate_demo(tmp_path / "a", SMALL).train_json.read_bytes()
    b = generate_demo(tmp_path / "b", DemoConfig(seed=4, train_sizes=SMALL.train_sizes, val_size=5))
    assert a != b.train_json.read_bytes()


def test_task_streams_are_independent(tmp_path):
    base = load(generate_demo(tmp_path / "a", DemoConfig(train_sizes={"color": 5, "shape": 6})).train_json)
    more = load(generate_demo(tmp_path / "b", DemoConfig(train_sizes={"color": 9, "shape": 6})).train_json)
    assert records_of(base, "shape") == records_of(more, "shape")
    assert records_of(more, "color")[:5] == records_of(base, "color")  # growing a task keeps its prefix


# ------------------------------------------------------------------ records


def test_sizes_match_the_config(default_demo):
    _, train, val = default_demo
    assert Counter(r["task"] for r in train) == Counter(DEFAULT_TRAIN_SIZES)
    assert Counter(r["task"] for r in val) == Counter({t: DemoConfig().val_size for t in DEMO_TASKS})


def test_only_configured_tasks_are_generated(tmp_path):
    paths = generate_demo(tmp_path, DemoConfig(train_sizes={"text": 4, "ocr": 0}, val_size=2))
    assert Counter(r["task"] for r in load(paths.train_json)) == Counter({"text": 4})
    assert Counter(r["task"] for r in load(paths.val_json)) == Counter({"text": 2, "ocr": 2})


def test_every_record_is_well_formed(default_demo):
    paths, train, val = default_demo
    size = DemoConfig().image_size
    ids = [r["id"] for r in train + val]
    assert len(set(ids)) == len(ids)
    for record in train + val:
        assert set(record) <= {"id", "image", "conversations", "task"}
        assert isinstance(record["id"], str) and record["task"] in DEMO_TASKS
        turns = record["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(isinstance(t["value"], str) and t["value"].strip() for t in turns)
        image_tokens = [t["value"].count("<image>") for t in turns]
        if "image" in record:
            assert image_tokens == [1] + [0] * (len(turns) - 1), record["id"]
            assert turns[0]["value"].startswith("<image>\n")
            with Image.open(paths.image_folder / record["image"]) as img:
                assert (img.size, img.mode) == ((size, size), "RGB")
        else:
            assert sum(image_tokens) == 0 and record["task"] == "text"
    image_tasks = {r["task"] for r in train if "image" in r}
    assert image_tasks == set(DEMO_TASKS) - {"text"}


def test_configured_image_size(tmp_path):
    paths = generate_demo(tmp_path, DemoConfig(image_size=96, train_sizes={"ocr": 2, "count": 2}, val_size=1))
    for record in load(paths.train_json) + load(paths.val_json):
        assert Image.open(paths.image_folder / record["image"]).size == (96, 96)


def test_held_out_split_is_disjoint_from_train(default_demo):
    _, train, val = default_demo
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    assert not {r.get("image") for r in train if "image" in r} & {r.get("image") for r in val if "image" in r}
    assert all("-val-" in r["id"] for r in val) and all("-train-" in r["id"] for r in train)


def test_multi_turn_conversations_exist(default_demo):
    _, train, _ = default_demo
    rounds = Counter(len(r["conversations"]) // 2 for r in records_of(train, "conversation"))
    assert set(rounds) == {2, 3}
    assert all(len(r["conversations"]) == 2 for r in train if r["task"] != "conversation")


def test_redundancy_is_uneven(default_demo):
    _, train, _ = default_demo

    def distinct_ratio(task):
        recs = records_of(train, task)
        return len({(question(r), answer(r)) for r in recs}) / len(recs)

    assert distinct_ratio("color") <= 8 / DEFAULT_TRAIN_SIZES["color"]  # 8 answers, one question
    assert distinct_ratio("ocr") > 0.9
    assert distinct_ratio("caption") > 0.9


# ------------------------------------------------------------------ answers match pixels


def test_color_answer_is_the_dominant_colour(default_demo):
    paths, train, _ = default_demo
    for record in records_of(train, "color")[:60]:
        img = pixels(paths, record)
        values, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
        order = np.argsort(-counts)
        non_background = [tuple(int(v) for v in values[i]) for i in order if tuple(values[i]) != BACKGROUND]
        assert non_background[0] == COLORS[answer(record)], record["id"]


def classify_shape(mask: np.ndarray) -> str:
    """Name a single filled shape from its fill ratio and the row where it is widest."""
    rows, cols = np.nonzero(mask)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    fill = mask.sum() / (height * width)
    widths = mask[rows.min() : rows.max() + 1].sum(axis=1)
    widest_at = np.argmax(widths) / (height - 1)
    if fill > 0.95:
        return "square"
    if fill > 0.7:
        return "circle"
    if fill < 0.45:
        return "star"
    return "triangle" if widest_at > 0.8 else "diamond"


def test_shape_answer_matches_the_drawn_shape(default_demo):
    paths, train, _ = default_demo
    recs = records_of(train, "shape")[:80]
    for record in recs:
        mask = (pixels(paths, record) != BACKGROUND).any(axis=2)
        assert classify_shape(mask) == answer(record), record["id"]
    assert len({answer(r) for r in recs}) == 5


def occupied_cells(img: np.ndarray) -> int:
    size = img.shape[0]
    mask = (img != BACKGROUND).any(axis=2)
    edges = [round(i * size / 3) for i in range(4)]
    return sum(
        bool(mask[edges[r] : edges[r + 1], edges[c] : edges[c + 1]].any()) for r in range(3) for c in range(3)
    )


def test_count_answer_matches_occupied_cells(default_demo):
    paths, train, _ = default_demo
    recs = records_of(train, "count")[:80]
    for record in recs:
        assert occupied_cells(pixels(paths, record)) == int(answer(record)), record["id"]
    assert {answer(r) for r in recs} == {"1", "2", "3", "4", "5"}


def centroid(img: np.ndarray, color: str) -> tuple[float, float]:
    rows, cols = np.nonzero((img == COLORS[color]).all(axis=2))
    return rows.mean(), cols.mean()


SPATIAL = re.compile(r"Is the (\w+) \w+ (to the left of|to the right of|above|below) the (\w+) \w+\?")


def test_spatial_answer_matches_positions(default_demo):
    paths, train, _ = default_demo
    recs = records_of(train, "spatial")[:80]
    for record in recs:
        color_a, relation, color_b = SPATIAL.search(question(record)).groups()
        img = pixels(paths, record)
        (ya, xa), (yb, xb) = centroid(img, color_a), centroid(img, color_b)
        truth = {"to the left of": xa < xb, "to the right of": xa > xb, "above": ya < yb, "below": ya > yb}
        assert answer(record) == ("Yes" if truth[relation] else "No"), record["id"]
    assert {answer(r) for r in recs} == {"Yes", "No"}


def test_choice_answer_names_a_colour_in_the_image(default_demo):
    paths, train, _ = default_demo
    for record in records_of(train, "choice")[:60]:
        options = dict(re.findall(r"^([A-D])\. (\w+)$", question(record), flags=re.M))
        assert sorted(options) == ["A", "B", "C", "D"] and len(set(options.values())) == 4
        present = shape_colors(pixels(paths, record))
        assert options[answer(record)] in present, record["id"]
        if len(present) == 1:
            assert {options[answer(record)]} == set(present)


def test_caption_mentions_exactly_the_colours_present(default_demo):
    paths, train, _ = default_demo
    for record in records_of(train, "caption")[:60]:
        present = set(shape_colors(pixels(paths, record)))
        mentioned = {w.strip(".,:") for w in answer(record).split()} & set(COLORS)
        assert mentioned == present, record["id"]


def test_ocr_answer_is_rendered_text(default_demo):
    paths, train, _ = default_demo
    for record in records_of(train, "ocr")[:30]:
        assert len(answer(record)) == 3 and set(answer(record)) <= set(OCR_ALPHABET)
        dark = (pixels(paths, record) < 100).all(axis=2)
        assert dark.sum() > 30, record["id"]  # the glyphs are large and dark


def test_text_answers_are_correct(default_demo):
    _, train, _ = default_demo
    opposites = dict(demo.OPPOSITES) | {b: a for a, b in demo.OPPOSITES}
    for record in records_of(train, "text"):
        q, a = question(record), answer(record)
        if m := re.fullmatch(r"What is (\d+) plus (\d+)\?", q):
            assert int(a) == int(m[1]) + int(m[2])
        elif m := re.fullmatch(r"What is (\d+) minus (\d+)\?", q):
            assert int(a) == int(m[1]) - int(m[2]) >= 0
        elif m := re.fullmatch(r"Which number is larger, (\d+) or (\d+)\?", q):
            assert int(a) == max(int(m[1]), int(m[2]))
        else:
            m = re.fullmatch(r"What is the opposite of (\w+)\?", q)
            assert m and opposites[m[1]] == a


# ------------------------------------------------------------------ cache


def test_ensure_demo_caches_by_config(tmp_path):
    paths = ensure_demo(SMALL, tmp_path)
    assert paths.root.parent == tmp_path and paths.root.name.startswith(f"demo-v{demo.GENERATOR_VERSION}-")
    (paths.root / "sentinel").write_text("kept")
    assert ensure_demo(SMALL, tmp_path) == paths
    assert (paths.root / "sentinel").read_text() == "kept"  # reused, not regenerated
    other = ensure_demo(DemoConfig(seed=4, train_sizes=SMALL.train_sizes, val_size=5), tmp_path)
    assert other.root != paths.root
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([paths.root.name, other.root.name])


def test_ensure_demo_default_location_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_TIVE_CACHE", str(tmp_path))
    paths = ensure_demo(DemoConfig(train_sizes={"text": 2}, val_size=1))
    assert paths.root.parent == tmp_path / "demo"


def test_ensure_demo_survives_losing_the_race(tmp_path, monkeypatch):
    config = DemoConfig(train_sizes={"color": 3}, val_size=1)
    final = tmp_path / f"demo-v{demo.GENERATOR_VERSION}-{demo.config_key(config)}"
    real_generate = demo.generate_demo

    def generate_then_lose(root, cfg):
        real_generate(final, cfg)  # another process finishes first
        return real_generate(root, cfg)

    monkeypatch.setattr(demo, "generate_demo", generate_then_lose)
    assert ensure_demo(config, tmp_path).root == final
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # the loser's temp folder is gone


def test_ensure_demo_refuses_an_incomplete_cache_folder(tmp_path):
    config = DemoConfig(train_sizes={"text": 2}, val_size=1)
    final = tmp_path / f"demo-v{demo.GENERATOR_VERSION}-{demo.config_key(config)}"
    final.mkdir()
    (final / "train.json").write_text("[]")
    with pytest.raises(RuntimeError, match="incomplete"):
        ensure_demo(config, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_ensure_demo_from_two_processes(tmp_path):
    config = DemoConfig(seed=11, train_sizes={t: 20 for t in DEMO_TASKS}, val_size=3)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as pool:
        results = list(pool.map(ensure_demo, [config, config], [tmp_path, tmp_path]))
    assert results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == [results[0].root.name]
    reference = folder_digest(generate_demo(tmp_path.parent / "reference", config).root)
    cached = folder_digest(results[0].root)
    cached.pop("config.json")
    assert cached == reference
