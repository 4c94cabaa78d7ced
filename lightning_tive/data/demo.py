"""The built-in demo mixture: a seeded, procedurally generated visual-instruction pool.

It mirrors the *shape* of LLaVA-665K (short-answer VQA, multiple choice, captions, OCR,
text-only, multi-turn chat) at toy scale, with deliberately uneven redundancy between tasks.
Records are written as LLaVA JSON plus PNG files, so they go through the same reader as real data.
Besides the nine instruction tasks (stage 2), an `align` task gives a caption pool for stage 1
(LLaVA's feature alignment), drawn with its own stream and disjoint from a given stage-2 mixture.
See docs/data.md for the per-task design.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import PIL
from PIL import Image, ImageDraw, ImageFont, features

from lightning_tive.files import build_cache_folder
from lightning_tive.paths import default_cache_root

# Bump whenever records or pixels for an unchanged config would change: it keys the cache.
GENERATOR_VERSION = 1

DEMO_TASKS: tuple[str, ...] = (
    "color",
    "shape",
    "count",
    "spatial",
    "choice",
    "caption",
    "ocr",
    "text",
    "conversation",
)

# Stage 1 (alignment): brief captions of every kind of scene the instruction tasks show.
ALIGN_TASK = "align"
ALIGN_PROMPTS: tuple[str, ...] = (
    "Give a brief description of the image.",
    "Describe the image concisely.",
    "What is in the image?",
)

TASK_EVAL_KIND: dict[str, str] = {
    ALIGN_TASK: "token_f1",
    "color": "exact_match",
    "shape": "exact_match",
    "count": "exact_match",
    "spatial": "exact_match",
    "choice": "exact_match",
    "caption": "token_f1",
    "ocr": "exact_match",
    "text": "exact_match",
    "conversation": "token_f1",
}

# Uneven on purpose (see the doc): big near-duplicate tasks first, small hard ones last.
DEFAULT_TRAIN_SIZES: dict[str, int] = {
    "color": 1200,
    "shape": 800,
    "count": 500,
    "spatial": 400,
    "choice": 300,
    "caption": 250,
    "ocr": 300,
    "text": 400,
    "conversation": 200,
}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 200, 20),
    "orange": (245, 130, 20),
    "purple": (140, 50, 180),
    "pink": (240, 110, 190),
    "brown": (130, 80, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
TEXT_COLOR: tuple[int, int, int] = (20, 20, 20)
# No O/0 or I/1: they are unreadable at 64 px and would make OCR labels noisy.
OCR_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
OCR_LENGTH = 3

SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
IMAGE_TOKEN = "<image>"

# 3x3 grid cells in row-major order, used by every multi-shape task.
CELL_PHRASES: tuple[str, ...] = (
    "in the top left corner",
    "at the top",
    "in the top right corner",
    "on the left",
    "in the center",
    "on the right",
    "in the bottom left corner",
    "at the bottom",
    "in the bottom right corner",
)
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image in detail.",
    "What do you see in this image?",
    "Give a detailed description of the image.",
)
OPPOSITES: tuple[tuple[str, str], ...] = (
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("left", "right"),
    ("fast", "slow"),
    ("day", "night"),
    ("open", "closed"),
    ("light", "dark"),
    ("old", "new"),
    ("wet", "dry"),
    ("high", "low"),
    ("full", "empty"),
    ("early", "late"),
    ("happy", "sad"),
    ("top", "bottom"),
    ("black", "white"),
)

Shape = tuple[str, str, int]  # (color, shape, grid cell)


@dataclass
class DemoConfig:
    """Settings of the demo mixture; its hash keys the cache folder."""

    seed: int = 0
    image_size: int = 64
    train_sizes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_TRAIN_SIZES))
    val_size: int = 100
    # A mixture (DemoConfig fields; {} is the default one) whose images this one must not contain:
    # the stage-1 caption pool is drawn disjoint from the stage-2 pool and its held-out split.
    disjoint_from: dict | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.train_sizes) - set(DEMO_TASKS) - {ALIGN_TASK})
        if unknown:
            raise ValueError(f"unknown demo task(s) {unknown}; choose from {[*DEMO_TASKS, ALIGN_TASK]}")
        if self.disjoint_from is not None:
            DemoConfig(**self.disjoint_from)  # refuse a bad reference now, not at generation
        negative = {t: n for t, n in self.train_sizes.items() if n < 0}
        if negative or self.val_size < 0:
            raise ValueError(f"sizes must be >= 0, got train_sizes={negative} val_size={self.val_size}")
        if self.image_size < 32:
            raise ValueError(
                f"image_size must be >= 32 for shapes and glyphs to be visible, got {self.image_size}"
            )

    def tasks(self) -> list[str]:
        """Tasks to generate, in DEMO_TASKS order (`align` last)."""
        return [t for t in (*DEMO_TASKS, ALIGN_TASK) if t in self.train_sizes]


@dataclass(frozen=True)
class DemoPaths:
    """Where a generated demo lives."""

    root: Path
    train_json: Path
    val_json: Path
    image_folder: Path

    @classmethod
    def under(cls, root: Path) -> DemoPaths:
        """The standard layout below `root`."""
        root = Path(root)
        return cls(root, root / "train.json", root / "val.json", root / "images")


# --------------------------------------------------------------------------- drawing


def _new_canvas(size: int) -> Image.Image:
    return Image.new("RGB", (size, size), BACKGROUND)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[int, int]]:
    if shape == "triangle":
        pts = [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    elif shape == "diamond":
        pts = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    elif shape == "star":
        # A fat inner radius keeps the star one blob at ~7 px.
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.5 * r
            angle = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle)))
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    return [(round(x), round(y)) for x, y in pts]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, cx: float, cy: float, r: float) -> None:
    """Draw one filled, non-antialiased shape of radius `r` centred at (cx, cy)."""
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse([round(cx - r), round(cy - r), round(cx + r), round(cy + r)], fill=fill)
    elif shape == "square":
        h = 0.85 * r  # similar area to the circle
        draw.rectangle([round(cx - h), round(cy - h), round(cx + h), round(cy + h)], fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=fill)


def _draw_in_cells(size: int, shapes: list[Shape], rng: random.Random) -> Image.Image:
    """Draw small shapes, each wholly inside its own 3x3 grid cell, so they never touch."""
    img = _new_canvas(size)
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for color, shape, idx in shapes:
        row, col = divmod(idx, 3)
        r = cell * rng.uniform(0.28, 0.36)
        slack = cell / 2 - r - 1
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        draw_shape(draw, shape, color, cx, cy, r)
    return img


def _draw_single(
    size: int, color: str, shape: str, radius: float, jitter: float, rng: random.Random
) -> Image.Image:
    img = _new_canvas(size)
    cx = size * (0.5 + rng.uniform(-jitter, jitter))
    cy = size * (0.5 + rng.uniform(-jitter, jitter))
    draw_shape(ImageDraw.Draw(img), shape, color, cx, cy, size * radius)
    return img


@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont | None:
    """Pillow's bundled scalable font, or None where Pillow lacks FreeType."""
    try:
        return ImageFont.load_default(size=px)
    except (ImportError, OSError, TypeError, AttributeError):
        return None


def render_text(size: int, text: str, rng: random.Random) -> Image.Image:
    """Render `text` large and dark on the background, with a small random offset."""
    font = _font(max(8, round(size * 0.4)))
    if font is None:
        # Bitmap fallback: draw the ~11 px default font small, then upscale without blurring.
        small = Image.new("RGB", (size // 4 * 2, size // 4), BACKGROUND)
        ImageDraw.Draw(small).text((1, 1), text, fill=TEXT_COLOR, font=ImageFont.load_default())
        img = _new_canvas(size)
        img.paste(small.resize((size, size // 2), Image.Resampling.NEAREST), (0, size // 4))
        return img
    img = _new_canvas(size)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    room_x = max(0.0, (size - (right - left)) / 2 - 1)
    room_y = max(0.0, (size - (bottom - top)) / 2 - 1)
    x = (size - (right - left)) / 2 - left + rng.uniform(-room_x, room_x) * 0.6
    y = (size - (bottom - top)) / 2 - top + rng.uniform(-room_y, room_y) * 0.6
    draw.text((round(x), round(y)), text, fill=TEXT_COLOR, font=font)
    return img


# --------------------------------------------------------------------------- tasks
# Each task maker takes (rng, image_size) and returns (image or None, conversation turns).

Turns = list[tuple[str, str]]  # (human, gpt) pairs; the image token is added later
TaskOutput = tuple[Image.Image | None, Turns]


def _distinct_shapes(rng: random.Random, n: int) -> list[Shape]:
    """`n` shapes with pairwise different colours, kinds and cells, so each is nameable."""
    colors = rng.sample(list(COLORS), n)
    kinds = rng.sample(SHAPES, n)
    cells = rng.sample(range(9), n)
    return list(zip(colors, kinds, cells, strict=True))


def _make_color(rng: random.Random, size: int) -> TaskOutput:
    # Only 8 colours x 5 kinds = 40 underlying cases; records differ by a few pixels of jitter.
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    img = _draw_single(size, color, shape, radius=0.30, jitter=0.05, rng=rng)
    return img, [(f"What color is the shape?\n{SHORT_ANSWER}", color)]


def _make_shape(rng: random.Random, size: int) -> TaskOutput:
    # Same 40 cases as `color`, with more size and position jitter.
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    img = _draw_single(size, color, shape, radius=rng.uniform(0.22, 0.34), jitter=0.12, rng=rng)
    return img, [(f"What shape is in the image?\n{SHORT_ANSWER}", shape)]


def _make_count(rng: random.Random, size: int) -> TaskOutput:
    n = rng.randint(1, 5)
    cells = rng.sample(range(9), n)
    shapes = [(rng.choice(list(COLORS)), rng.choice(SHAPES), c) for c in cells]
    img = _draw_in_cells(size, shapes, rng)
    return img, [(f"How many shapes are in the image?\n{SHORT_ANSWER}", str(n))]


_RELATIONS = {
    # relation -> (axis index into (row, col), True when a's coordinate is smaller)
    "to the left of": (1, True),
    "to the right of": (1, False),
    "above": (0, True),
    "below": (0, False),
}


def _make_spatial(rng: random.Random, size: int) -> TaskOutput:
    relation = rng.choice(list(_RELATIONS))
    axis, a_smaller = _RELATIONS[relation]
    answer = rng.random() < 0.5
    (ca, sa, _), (cb, sb, _) = _distinct_shapes(rng, 2)
    # Pick two cells that differ along the asked axis, then order them to make `answer` true.
    while True:
        cell_a, cell_b = rng.sample(range(9), 2)
        if divmod(cell_a, 3)[axis] != divmod(cell_b, 3)[axis]:
            break
    a_is_smaller = divmod(cell_a, 3)[axis] < divmod(cell_b, 3)[axis]
    if a_is_smaller != (a_smaller == answer):
        cell_a, cell_b = cell_b, cell_a
    img = _draw_in_cells(size, [(ca, sa, cell_a), (cb, sb, cell_b)], rng)
    question = f"Is the {ca} {sa} {relation} the {cb} {sb}?\n{SHORT_ANSWER}"
    return img, [(question, "Yes" if answer else "No")]


def _make_choice(rng: random.Random, size: int) -> TaskOutput:
    shapes = _distinct_shapes(rng, rng.randint(1, 2))
    color, shape, _ = shapes[0]
    # The other shape's colour is a distractor when present: it forces looking at the right shape.
    distractors = [c for c, _, _ in shapes[1:]]
    others = [c for c in COLORS if c != color and c not in distractors]
    options = [color, *distractors, *rng.sample(others, 3 - len(distractors))]
    rng.shuffle(options)
    letters = "ABCD"
    lines = "\n".join(f"{letters[i]}. {opt}" for i, opt in enumerate(options))
    img = _draw_in_cells(size, shapes, rng)
    question = f"What color is the {shape}?\n{lines}\n{CHOICE_SUFFIX}"
    return img, [(question, letters[options.index(color)])]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe(shapes: list[Shape]) -> str:
    parts = [
        f"{_article(c)} {c} {s} {CELL_PHRASES[cell]}" for c, s, cell in sorted(shapes, key=lambda x: x[2])
    ]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _count_sentence(n: int) -> str:
    return (
        "There is one shape in the image." if n == 1 else f"There are {NUMBER_WORDS[n]} shapes in the image."
    )


def _make_caption(rng: random.Random, size: int) -> TaskOutput:
    shapes = _distinct_shapes(rng, rng.randint(1, 3))
    img = _draw_in_cells(size, shapes, rng)
    noun = "shape" if len(shapes) == 1 else "shapes"
    caption = (
        f"The image shows {NUMBER_WORDS[len(shapes)]} {noun} on a white background: {_describe(shapes)}."
    )
    return img, [(rng.choice(CAPTION_PROMPTS), caption)]


def _make_ocr(rng: random.Random, size: int) -> TaskOutput:
    text = "".join(rng.choice(OCR_ALPHABET) for _ in range(OCR_LENGTH))
    img = render_text(size, text, rng)
    return img, [(f"What is written in the image?\n{SHORT_ANSWER}", text)]


def _make_text(rng: random.Random, size: int) -> TaskOutput:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return None, [(f"What is {a} plus {b}?", str(a + b))]
    if kind == 1:
        a, b = sorted((rng.randint(0, 20), rng.randint(0, 20)), reverse=True)
        return None, [(f"What is {a} minus {b}?", str(a - b))]
    if kind == 2:
        a, b = rng.sample(range(21), 2)
        return None, [(f"Which number is larger, {a} or {b}?", str(max(a, b)))]
    word, opposite = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        word, opposite = opposite, word
    return None, [(f"What is the opposite of {word}?", opposite)]


def _make_conversation(rng: random.Random, size: int) -> TaskOutput:
    shapes = _distinct_shapes(rng, rng.randint(1, 3))
    img = _draw_in_cells(size, shapes, rng)
    color, shape, cell = rng.choice(shapes)
    pool = [
        ("What shapes can you see in the image?", f"I can see {_describe(shapes)}."),
        ("How many shapes are there?", _count_sentence(len(shapes))),
        (f"What color is the {shape}?", f"The {shape} is {color}."),
        (f"Where is the {color} {shape}?", f"The {color} {shape} is {CELL_PHRASES[cell]} of the image."),
    ]
    return img, rng.sample(pool, rng.randint(2, 3))


def _make_align(rng: random.Random, size: int) -> TaskOutput:
    # The scenes of every instruction task, described briefly (as LLaVA's stage-1 captions are).
    kind = rng.random()
    if kind < 0.35:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        img = _draw_single(size, color, shape, radius=rng.uniform(0.22, 0.34), jitter=0.12, rng=rng)
        caption = f"{_article(color).capitalize()} {color} {shape}."
    elif kind < 0.85:
        n = rng.randint(1, 5)
        shapes = [(rng.choice(list(COLORS)), rng.choice(SHAPES), c) for c in rng.sample(range(9), n)]
        img = _draw_in_cells(size, shapes, rng)
        described = _describe(shapes)
        caption = f"{described[0].upper()}{described[1:]}."
    else:
        text = "".join(rng.choice(OCR_ALPHABET) for _ in range(OCR_LENGTH))
        img = render_text(size, text, rng)
        caption = f"The letters {text}."
    return img, [(rng.choice(ALIGN_PROMPTS), caption)]


TASK_MAKERS: dict[str, Callable[[random.Random, int], TaskOutput]] = {
    ALIGN_TASK: _make_align,
    "color": _make_color,
    "shape": _make_shape,
    "count": _make_count,
    "spatial": _make_spatial,
    "choice": _make_choice,
    "caption": _make_caption,
    "ocr": _make_ocr,
    "text": _make_text,
    "conversation": _make_conversation,
}


# --------------------------------------------------------------------------- writing


def _record(record_id: str, task: str, image_path: str | None, turns: Turns) -> dict:
    conversations = []
    for i, (human, gpt) in enumerate(turns):
        if i == 0 and image_path is not None:
            human = f"{IMAGE_TOKEN}\n{human}"
        conversations += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    record: dict = {"id": record_id}
    if image_path is not None:
        record["image"] = image_path
    record["conversations"] = conversations
    record["task"] = task
    return record


def image_digest(image: Image.Image) -> str:
    """Digest of an image's pixels (what "the same image" means for disjointness)."""
    rgb = image.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


def _generate_split(
    split: str, n_per_task: dict[str, int], config: DemoConfig, image_folder: Path, taken: set[str]
) -> list[dict]:
    records = []
    for task in config.tasks():
        # One independent stream per (seed, split, task): sizes of one task never shift another.
        rng = random.Random(f"lightning_tive-demo/{config.seed}/{split}/{task}")
        maker = TASK_MAKERS[task]
        (image_folder / task).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_task[task]):
            record_id = f"{task}-{split}-{i:05d}"
            image, turns = maker(rng, config.image_size)
            while task == ALIGN_TASK and image_digest(image) in taken:
                image, turns = maker(rng, config.image_size)  # redraw: never an image of `taken`
            image_path = None
            if image is not None:
                image_path = f"{task}/{record_id}.png"
                image.save(image_folder / image_path, format="PNG")
                if task == ALIGN_TASK:
                    taken.add(image_digest(image))  # nor one already in this pool
            records.append(_record(record_id, task, image_path, turns))
    return records


def _images_of(config: DemoConfig) -> set[str]:
    """Pixel digests of every image in a mixture's train and val splits (generated or cached)."""
    paths = ensure_demo(config)
    digests = set()
    for record in json.loads(paths.train_json.read_text()) + json.loads(paths.val_json.read_text()):
        if record.get("image") is not None:
            with Image.open(paths.image_folder / record["image"]) as img:
                digests.add(image_digest(img))
    return digests


def _write_json(path: Path, records: list[dict]) -> None:
    # One record per line: diffable, and the bytes depend only on the records.
    body = ",\n".join(json.dumps(r, ensure_ascii=False, sort_keys=False) for r in records)
    path.write_text(f"[\n{body}\n]\n" if records else "[]\n", encoding="utf-8")


def generate_demo(root: Path, config: DemoConfig) -> DemoPaths:
    """Write the demo mixture (train.json, val.json, images/) under `root`; same config, same bytes."""
    paths = DemoPaths.under(Path(root))
    paths.image_folder.mkdir(parents=True, exist_ok=True)
    taken = _images_of(DemoConfig(**config.disjoint_from)) if config.disjoint_from is not None else set()
    train = _generate_split("train", config.train_sizes, config, paths.image_folder, taken)
    val = _generate_split("val", {t: config.val_size for t in config.tasks()}, config, paths.image_folder, taken)
    _write_json(paths.train_json, train)
    _write_json(paths.val_json, val)
    return paths


def renderer_fingerprint() -> str:
    """Pillow version and FreeType availability: they decide the PNG bytes, so they key the cache."""
    return f"pillow-{PIL.__version__}-freetype-{int(bool(features.check('freetype2')))}"


def config_key(config: DemoConfig) -> str:
    """Short hash of the config, the generator version and the renderer."""
    payload = json.dumps(
        {"config": asdict(config), "generator": GENERATOR_VERSION, "renderer": renderer_fingerprint()},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def ensure_demo(config: DemoConfig, cache_dir: Path | None = None) -> DemoPaths:
    """Generate the demo into a config-keyed cache folder once, atomically, and reuse it afterwards."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_root() / "demo"
    final = cache_dir / f"demo-v{GENERATOR_VERSION}-{config_key(config)}"

    def build(tmp: Path) -> None:
        generate_demo(tmp, config)
        (tmp / "config.json").write_text(
            json.dumps({"config": asdict(config), "generator": GENERATOR_VERSION}, indent=2, sort_keys=True) + "\n"
        )

    # val.json is written last, and folders appear only by rename: one holding it is complete.
    return DemoPaths.under(build_cache_folder(final, build, "val.json"))


def main(argv: list[str] | None = None) -> None:
    """Command line: generate the demo into a folder (or the cache) and print where it is."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="target folder; default: the cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--val-size", type=int, default=100)
    args = parser.parse_args(argv)
    config = DemoConfig(seed=args.seed, image_size=args.image_size, val_size=args.val_size)
    paths = generate_demo(args.out, config) if args.out else ensure_demo(config)
    print(f"train: {paths.train_json}\nval:   {paths.val_json}\nimages: {paths.image_folder}")


if __name__ == "__main__":
    main()
