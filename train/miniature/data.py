"""The miniature's world: seeded scenes of coloured shapes, their pictures, and everything said about them.

A scene is up to five shapes (six colours, five kinds, two sizes) placed in distinct cells of a 3 x 3 grid on
a plain or softly graded neutral background, so that every question about it has exactly one short, canonical
answer. From scenes come, all seeded and reproducible:

- pictures (PNG, rendered at twice their size and downsampled, so edges are clean and anti-aliased);
- stage-1 captions (LLaVA's LCS-558K shape: a brief caption, template `plain`);
- stage-2 conversations of LLaVA-Instruct's three kinds (conversation, detailed description, complex
  reasoning) plus LLaVA-1.5-style short-answer VQA turns carrying the evaluation suffixes;
- text-only documents that pre-train the language model (the same language, scenes described in words);
- held-out evaluation questions (JSONL, one record per question) of five kinds: colour, shape, count,
  yes/no and multiple choice, scored by `llavacli.evaluate`.

The datasets are written in LLaVA's JSON format: a list of {"id", "image", "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}, image paths relative to the image folder.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from llavacli.prompts import IMAGE, OPTION_LETTER, SHORT_ANSWER

# ---------------------------------------------------------------------------------------------------------------
# The vocabulary of the world

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (37, 84, 220),
    "yellow": (245, 205, 20),
    "purple": (140, 60, 190),
    "orange": (245, 125, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
SIZES = ("small", "large")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (244, 244, 242),
    "light gray": (196, 196, 196),
    "dark gray": (66, 66, 70),
    "black": (18, 18, 20),
    "beige": (232, 222, 196),
}
MAX_OBJECTS = 5
GRID = 3
JITTER = 0.035  # how far (as a fraction of the picture) a shape's centre strays from its cell's centre
CELLS = [(r, c) for r in range(GRID) for c in range(GRID)]
# Where a cell is, as a short answer and inside a sentence.
POSITION = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}  # fmt: skip
WHERE = {
    (0, 0): "in the top left corner", (0, 1): "at the top", (0, 2): "in the top right corner",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left corner", (2, 1): "at the bottom", (2, 2): "in the bottom right corner",
}  # fmt: skip
NUMBER = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
LETTERS = "ABCD"

# Evaluation kinds (the `kind` of a question record) and the scoring rule each uses (llavacli.evaluate).
KIND_COLOR, KIND_SHAPE, KIND_COUNT, KIND_YESNO, KIND_CHOICE = "colour", "shape", "count", "yes/no", "multiple choice"
EVAL_KINDS = (KIND_COLOR, KIND_SHAPE, KIND_COUNT, KIND_YESNO, KIND_CHOICE)

IMAGE_SIZE = 192  # stored pictures; the vision tower sees them resized by llavacli.images.preprocess
TOWER_SIZE = 96  # what the vision tower sees ...
PATCHES = 3  # ... as PATCHES x PATCHES patches: one patch per grid cell, one image token per place
RENDER_SCALE = 2  # drawn at twice the size, then downsampled (anti-aliasing)


# ---------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    size: str
    cell: tuple[int, int]
    x: float  # centre, as a fraction of the picture's width
    y: float
    radius: float  # as a fraction of the picture's width

    @property
    def name(self) -> str:  # "red star"
        return f"{self.color} {self.kind}"


@dataclass
class Scene:
    id: str
    background: str
    shapes: list[Shape]
    # rendering details that change pixels but not meaning
    tint: tuple[int, int, int] = (0, 0, 0)
    gradient: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (strength, dx, dy)
    jitter: list[tuple[int, int, int]] = field(default_factory=list)
    rotation: list[float] = field(default_factory=list)

    def reading_order(self) -> list[Shape]:
        return sorted(self.shapes, key=lambda s: s.cell)

    def count(self, *, kind: str | None = None, color: str | None = None) -> int:
        return sum(1 for s in self.shapes if (kind is None or s.kind == kind) and (color is None or s.color == color))

    def to_json(self) -> dict:
        return asdict(self)


def make_scene(rng: random.Random, scene_id: str, n: int | None = None) -> Scene:
    """A random scene: 1-5 shapes, each in its own grid cell, jittered inside it."""
    n = n if n is not None else rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(CELLS, n)
    cell_w = 1.0 / GRID
    shapes = []
    for cell in cells:
        size = rng.choice(SIZES)
        radius = cell_w * (rng.uniform(0.34, 0.39) if size == "large" else rng.uniform(0.23, 0.27))
        slack = min(JITTER, cell_w / 2 - radius * 1.1)
        x = (cell[1] + 0.5) * cell_w + rng.uniform(-slack, slack)
        y = (cell[0] + 0.5) * cell_w + rng.uniform(-slack, slack)
        shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), size, cell, x, y, radius))
    background = rng.choice(list(BACKGROUNDS))
    return Scene(
        id=scene_id,
        background=background,
        shapes=shapes,
        tint=tuple(rng.randint(-8, 8) for _ in range(3)),
        gradient=(rng.choice([0.0, 0.0, rng.uniform(8, 22)]), rng.uniform(-1, 1), rng.uniform(-1, 1)),
        jitter=[tuple(rng.randint(-14, 14) for _ in range(3)) for _ in shapes],
        rotation=[rng.uniform(-12, 12) for _ in shapes],
    )


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    """Each scene has its own stream, so any one of them can be made again alone."""
    return random.Random(f"miniature/{seed}/{split}/{index}")


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _clip(v: float) -> int:
    return max(0, min(255, int(round(v))))


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def rotated(points):
        a = math.radians(angle)
        ca, sa = math.cos(a), math.sin(a)
        return [(cx + px * ca - py * sa, cy + px * sa + py * ca) for px, py in points]

    if kind == "square":
        h = r * 0.82
        return rotated([(-h, -h), (h, -h), (h, h), (-h, h)])
    if kind == "triangle":
        R = r * 1.08
        return rotated([(R * math.cos(math.radians(a)), R * math.sin(math.radians(a)) + r * 0.12) for a in (-90, 30, 150)])
    if kind == "star":
        R, q = r * 1.08, r * 1.08 * 0.45
        pts = []
        for i in range(10):
            a = math.radians(-90 + 36 * i)
            rad = R if i % 2 == 0 else q
            pts.append((rad * math.cos(a), rad * math.sin(a) + r * 0.06))
        return rotated(pts)
    if kind == "cross":
        a, b = r * 0.95, r * 0.32
        return rotated([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)])
    raise ValueError(kind)


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, side: int, fill, angle: float) -> None:
    cx, cy, r = s.x * side, s.y * side, s.radius * side
    if s.kind == "circle":
        draw.ellipse((cx - r * 0.92, cy - r * 0.92, cx + r * 0.92, cy + r * 0.92), fill=fill)
    else:
        draw.polygon(_polygon(s.kind, cx, cy, r, angle), fill=fill)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    side = size * RENDER_SCALE
    base = [c + t for c, t in zip(BACKGROUNDS[scene.background], scene.tint)]
    strength, dx, dy = scene.gradient
    if strength:
        # a soft linear gradient along (dx, dy), at most `strength` levels either side of the base colour
        norm = math.hypot(dx, dy) or 1.0
        axis = np.linspace(-1.0, 1.0, side, dtype=np.float32)
        ramp = (axis[None, :] * dx + axis[:, None] * dy) / norm
        pixels = np.asarray(base, dtype=np.float32)[None, None, :] + strength * ramp[:, :, None]
        img = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    else:
        img = Image.new("RGB", (side, side), tuple(_clip(c) for c in base))
    draw = ImageDraw.Draw(img)
    for s, jit, angle in zip(scene.shapes, scene.jitter, scene.rotation):
        fill = tuple(_clip(c + j) for c, j in zip(COLORS[s.color], jit))
        _draw_shape(draw, s, side, fill, angle)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def label_map(scene: Scene, size: int) -> Image.Image:
    """An 'L' image whose pixel value is 1 + the index of the shape covering it (0: background)."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    for i, (s, angle) in enumerate(zip(scene.shapes, scene.rotation)):
        _draw_shape(draw, s, size, i + 1, angle)
    return img


def patch_owners(scene: Scene, patches: int = PATCHES) -> np.ndarray:
    """For each patch of the tower's grid (row-major), the index of the shape whose cell holds it, or -1.

    A cell is (patches / GRID)^2 patches (one, as the miniature is built) and its shape lies inside it, so a
    patch shows at most one shape."""
    per = patches // GRID
    owners = np.full((patches, patches), -1, dtype=np.int64)
    for i, s in enumerate(scene.shapes):
        r, c = s.cell
        owners[r * per : (r + 1) * per, c * per : (c + 1) * per] = i
    return owners.reshape(-1)


EMPTY = "empty"


def patch_word(s: Shape | None) -> str:
    return EMPTY if s is None else f"{s.size}{s.color}{s.kind}"


PATCH_WORDS = frozenset(f"{size}{color}{kind}" for size in SIZES for color in COLORS for kind in SHAPES)


def grid_text(scene: Scene) -> str:
    """The scene as the vision tower's patches would name it: one word per patch, row by row ("empty" where
    no shape is). The language model reads this where the picture will later be, so what the projector has to
    learn is only which patch is which word."""
    return " ".join(patch_word(scene.shapes[i] if i >= 0 else None) for i in patch_owners(scene))


# ---------------------------------------------------------------------------------------------------------------
# Language about a scene


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(s: Shape, with_size: bool = True) -> str:
    words = f"{s.size} {s.color} {s.kind}" if with_size else f"{s.color} {s.kind}"
    return f"{_article(words)} {words}"


def _count_phrase(n: int, kind: str | None = None, color: str | None = None) -> str:
    """'three red stars', 'one circle', 'no yellow shapes'."""
    noun = kind or "shape"
    if n != 1:
        noun = PLURAL.get(noun, noun + "s")
    words = [NUMBER[n]] + ([color] if color else []) + [noun]
    return " ".join(words)


def _there_are(n: int, kind: str | None = None, color: str | None = None) -> str:
    return f"There {'is' if n == 1 else 'are'} {_count_phrase(n, kind, color)}"


def caption(scene: Scene, rng: random.Random) -> str:
    """A brief caption, as in LLaVA's stage-1 pre-training data."""
    items = [_noun_phrase(s, with_size=rng.random() < 0.5) for s in scene.reading_order()]
    style = rng.randrange(3)
    if style == 0:
        return f"{_join(items)} on {_article(scene.background)} {scene.background} background."
    if style == 1:
        n = len(scene.shapes)
        return f"{_count_phrase(n)} on {_article(scene.background)} {scene.background} background: {_join(items)}."
    return f"{_cap(_join(items))}, {scene.background} background."


def description(scene: Scene) -> str:
    """The detailed description (LLaVA-Instruct's 'detail' kind): every shape, where, and a summary."""
    shapes = scene.reading_order()
    n = len(shapes)
    parts = [f"The image shows {_count_phrase(n)} on {_article(scene.background)} {scene.background} background."]
    for s in shapes:
        parts.append(f"{_cap(WHERE[s.cell])} there is {_noun_phrase(s)}.")
    colors = Counter(s.color for s in shapes)
    if n > 1:
        if len(colors) == 1:
            parts.append(f"All of the shapes are {shapes[0].color}.")
        else:
            common, k = colors.most_common(1)[0]
            if k > 1 and list(colors.values()).count(k) == 1:
                parts.append(f"{_cap(common)} is the most common color, with {_count_phrase(k)}.")
    return " ".join(parts)


# Question phrasings (training uses them all; evaluation draws from the same pool on held-out pictures).
Q_COUNT_ALL = ["How many shapes are there in the image?", "How many shapes are there?", "How many shapes can you see?", "How many objects are in the picture?"]
Q_COUNT_KIND = ["How many {plural} are there?", "How many {plural} are in the image?", "How many {plural} can you see?"]
Q_COUNT_COLOR = ["How many {color} shapes are there?", "How many {color} shapes are in the image?", "How many {color} objects can you see?"]
Q_COLOR = ["What color is {ref}?", "What is the color of {ref}?", "Which color does {ref} have?"]
Q_SHAPE = ["What shape is {ref}?", "What is the shape of {ref}?", "Which shape is {ref}?"]
Q_WHERE = ["Where is {ref}?", "Where is {ref} in the image?", "In which part of the image is {ref}?"]
Q_EXISTS = ["Is there {np} in the image?", "Is there {np}?", "Does the image contain {np}?"]
Q_SIZE = ["Is {ref} large or small?", "What size is {ref}?"]
Q_DETAIL = [
    "Describe the image in detail.",
    "What do you see in this image? Describe it in detail.",
    "Give a detailed description of the picture.",
    "Explain what is shown in the image, shape by shape.",
    "Describe the following image.",
]
Q_BRIEF = [
    "Render a clear and concise summary of the photo.",
    "Describe the image concisely.",
    "Give a short caption for the image.",
    "Summarize the visual content of the image.",
    "Share a concise interpretation of the image provided.",
]


def references(scene: Scene, s: Shape) -> dict[str, str]:
    """The ways to pick out shape s unambiguously: by kind, by colour, by both, by place."""
    refs = {}
    if scene.count(kind=s.kind) == 1:
        refs["kind"] = f"the {s.kind}"
    if scene.count(color=s.color) == 1:
        refs["color"] = f"the {s.color} shape"
    if scene.count(kind=s.kind, color=s.color) == 1:
        refs["both"] = f"the {s.color} {s.kind}"
    refs["place"] = f"the shape {WHERE[s.cell]}"
    return refs


@dataclass
class QA:
    question: str
    short: str  # the canonical short answer (lower case, digits for counts)
    long: str  # the same answer as a sentence
    kind: str  # which of EVAL_KINDS it exercises, or "position", "size", "reasoning", ...
    choices: list[str] | None = None


PLACE_REF = 0.1  # how often a colour or shape question names its shape by place even when it could by kind/colour


def qa_color(scene: Scene, rng: random.Random, s: Shape | None = None, by_place: bool = False) -> QA:
    """"What color is the star?": the shape named by its kind where that is unique in the scene, else by place
    (always by place with by_place)."""
    if by_place:
        s = s or rng.choice(scene.shapes)
    elif s is None:
        named = [x for x in scene.shapes if scene.count(kind=x.kind) == 1]
        s = rng.choice(named or scene.shapes)
    by_kind = not by_place and scene.count(kind=s.kind) == 1 and rng.random() >= PLACE_REF
    ref = f"the {s.kind}" if by_kind else f"the shape {WHERE[s.cell]}"
    return QA(rng.choice(Q_COLOR).format(ref=ref), s.color, f"{_cap(ref)} is {s.color}.", KIND_COLOR)


def qa_shape(scene: Scene, rng: random.Random, s: Shape | None = None, by_place: bool = False) -> QA:
    """"What shape is the red object?": the shape named by its colour where that is unique, else by place
    (always by place with by_place)."""
    if by_place:
        s = s or rng.choice(scene.shapes)
    elif s is None:
        named = [x for x in scene.shapes if scene.count(color=x.color) == 1]
        s = rng.choice(named or scene.shapes)
    if not by_place and scene.count(color=s.color) == 1 and rng.random() >= PLACE_REF:
        ref = f"the {s.color} object"
        q = rng.choice(Q_SHAPE).format(ref=ref)
    else:
        ref = f"the shape {WHERE[s.cell]}"
        q = rng.choice(["What shape is {where}?", "Which shape is {where}?", "What is the shape {where}?"]).format(where=WHERE[s.cell])
    return QA(q, s.kind, f"{_cap(ref)} is {_article(s.kind)} {s.kind}.", KIND_SHAPE)


def qa_count(scene: Scene, rng: random.Random) -> QA:
    mode = rng.random()
    if mode < 0.5:
        n = len(scene.shapes)
        return QA(rng.choice(Q_COUNT_ALL), str(n), f"{_there_are(n)} in the image.", KIND_COUNT)
    if mode < 0.75:
        present = rng.random() < 0.8
        kind = rng.choice([s.kind for s in scene.shapes] if present else list(SHAPES))
        n = scene.count(kind=kind)
        return QA(rng.choice(Q_COUNT_KIND).format(plural=PLURAL[kind]), str(n), f"{_there_are(n, kind)} in the image.", KIND_COUNT)
    present = rng.random() < 0.8
    color = rng.choice([s.color for s in scene.shapes] if present else list(COLORS))
    n = scene.count(color=color)
    return QA(rng.choice(Q_COUNT_COLOR).format(color=color), str(n), f"{_there_are(n, None, color)} in the image.", KIND_COUNT)


def qa_exists(scene: Scene, rng: random.Random) -> QA:
    """POPE-style existence: half yes, half no, and half of the no's share a colour or a kind with the scene."""
    if rng.random() < 0.5:
        s = rng.choice(scene.shapes)
        color, kind = s.color, s.kind
    else:
        present = {(s.color, s.kind) for s in scene.shapes}
        if rng.random() < 0.5:  # adversarial: a colour or a kind that is there, in a pairing that is not
            s = rng.choice(scene.shapes)
            options = [(s.color, k) for k in SHAPES] + [(c, s.kind) for c in COLORS]
        else:
            options = [(c, k) for c in COLORS for k in SHAPES]
        options = [o for o in options if o not in present]
        color, kind = rng.choice(options)
    n = scene.count(kind=kind, color=color)
    np_ = f"{_article(color)} {color} {kind}"
    q = rng.choice(Q_EXISTS).format(np=np_)
    if n:
        where = [WHERE[s.cell] for s in scene.reading_order() if s.kind == kind and s.color == color]
        long = f"Yes, there {'is' if n == 1 else 'are'} {_count_phrase(n, kind, color)} {_join(where)}."
        return QA(q, "yes", long, KIND_YESNO)
    return QA(q, "no", f"No, there is no {color} {kind} in the image.", KIND_YESNO)


def qa_where(scene: Scene, rng: random.Random) -> QA:
    s = rng.choice(scene.shapes)
    refs = references(scene, s)
    refs.pop("place")
    if not refs:
        return qa_color(scene, rng, s)
    ref = rng.choice(list(refs.values()))
    return QA(rng.choice(Q_WHERE).format(ref=ref), POSITION[s.cell], f"{_cap(ref)} is {WHERE[s.cell]}.", "position")


def qa_size(scene: Scene, rng: random.Random) -> QA:
    s = rng.choice(scene.shapes)
    ref = rng.choice(list(references(scene, s).values()))
    return QA(rng.choice(Q_SIZE).format(ref=ref), s.size, f"{_cap(ref)} is {s.size}.", "size")


def qa_choice(scene: Scene, rng: random.Random) -> QA:
    """A colour or shape question with four lettered options, as LLaVA-1.5's multiple-choice data."""
    base = qa_color(scene, rng) if rng.random() < 0.5 else qa_shape(scene, rng)
    pool = list(COLORS) if base.kind == KIND_COLOR else list(SHAPES)
    options = [base.short] + rng.sample([p for p in pool if p != base.short], len(LETTERS) - 1)
    rng.shuffle(options)
    letter = LETTERS[options.index(base.short)]
    text = base.question + "\n" + "\n".join(f"{L}. {o}" for L, o in zip(LETTERS, options))
    return QA(text, letter, f"{letter}. {base.short}", KIND_CHOICE, options)


def qa_reasoning(scene: Scene, rng: random.Random) -> QA:
    """LLaVA-Instruct's 'complex reasoning' in miniature: comparisons and majorities, answered with a reason."""
    colors = Counter(s.color for s in scene.shapes)
    kinds = Counter(s.kind for s in scene.shapes)
    choice = rng.randrange(4)
    if choice == 0 and len(scene.shapes) > 1:
        top = colors.most_common()
        q = rng.choice(["Which color appears most often in the image?", "What is the most common color among the shapes?"])
        if len(top) > 1 and top[0][1] == top[1][1]:
            tied = sorted(c for c, k in top if k == top[0][1])
            return QA(q, "none", f"No single color appears most often: {_join(tied)} each appear {NUMBER[top[0][1]]} times." if top[0][1] > 1 else f"No single color appears most often: each color appears once.", "reasoning")
        c, k = top[0]
        rest = [f"{_count_phrase(v, None, col)}" for col, v in top[1:]]
        reason = f"there {'is' if k == 1 else 'are'} {_count_phrase(k, None, c)}" + (f", and only {_join(rest)}" if rest else "")
        return QA(q, c, f"{_cap(c)} appears most often: {reason}.", "reasoning")
    if choice == 1:
        a, b = rng.sample(SHAPES, 2)
        na, nb = kinds[a], kinds[b]
        q = f"Are there more {PLURAL[a]} than {PLURAL[b]}?"
        verdict = "yes" if na > nb else "no"
        return QA(q, verdict, f"{_cap(verdict)}. {_there_are(na, a)} and {_count_phrase(nb, b)}.", "reasoning")
    if choice == 2 and len(scene.shapes) > 1:
        q = rng.choice(["Are all the shapes the same color?", "Do all of the shapes have the same color?"])
        if len(colors) == 1:
            return QA(q, "yes", f"Yes, all of the shapes are {scene.shapes[0].color}.", "reasoning")
        return QA(q, "no", f"No. The shapes are {_join(sorted(colors))}.", "reasoning")
    n = len(scene.shapes)
    free = GRID * GRID - n
    q = "How many more shapes would fit if every cell of a three by three grid held one shape?"
    return QA(q, str(free), f"The image has {_count_phrase(n)} in a three by three grid of nine places, so {NUMBER[free] if free else 'no'} more would fit.", "reasoning")


SHORT_MAKERS = [qa_color, qa_shape, qa_count, qa_exists, qa_where, qa_choice, qa_color, qa_shape, qa_count]
CHAT_MAKERS = [qa_color, qa_shape, qa_count, qa_exists, qa_where, qa_size]


# ---------------------------------------------------------------------------------------------------------------
# Samples in LLaVA's JSON format


def _turns(qas: list[tuple[str, str]]) -> list[dict]:
    convs = []
    for i, (q, a) in enumerate(qas):
        convs.append({"from": "human", "value": (IMAGE + "\n" + q) if i == 0 else q})
        convs.append({"from": "gpt", "value": a})
    return convs


def short_prompt(qa: QA) -> str:
    """The question as LLaVA-1.5's evaluation (and its VQA training data) asks it."""
    return qa.question + "\n" + (OPTION_LETTER if qa.choices else SHORT_ANSWER)


def stage1_sample(scene: Scene, image: str, rng: random.Random, facts_share: float = 0.0) -> dict:
    """A stage-1 pair: a request for a brief caption and the caption, or with probability facts_share the scene's
    facts (`facts`) in its place.

    A brief caption lists the shapes in reading order, the order of the image tokens, so the frozen language
    model can say it by reading the tokens one after another: it asks nothing of the projector about where a
    patch is, nor which colour goes with which kind. The facts look each shape up by kind, colour and place,
    as the language model learnt to from patch words, so the projector must give it patches it can look up."""
    if facts_share and rng.random() < facts_share:
        return {"id": scene.id, "image": image, "conversations": _turns([(rng.choice(Q_BRIEF), facts(scene, rng))])}
    return {"id": scene.id, "image": image, "conversations": _turns([(rng.choice(Q_BRIEF), caption(scene, rng))])}


def stage2_sample(scene: Scene, image: str, rng: random.Random, kind: str | None = None) -> dict:
    """One instruction-tuning sample: 'vqa' (short answers, LLaVA-1.5 style), 'conversation', 'detail' or 'reasoning'."""
    kind = kind or rng.choices(["vqa", "conversation", "detail", "reasoning"], weights=[5, 3, 1, 1])[0]
    if kind == "vqa":
        qas = [rng.choice(SHORT_MAKERS)(scene, rng) for _ in range(rng.randint(3, 5))]
        pairs = [(short_prompt(q), q.short) for q in qas]
    elif kind == "conversation":
        qas = [rng.choice(CHAT_MAKERS)(scene, rng) for _ in range(rng.randint(2, 4))]
        pairs = [(q.question, q.long) for q in qas]
    elif kind == "detail":
        pairs = [(rng.choice(Q_DETAIL), description(scene))]
    elif kind == "reasoning":
        pairs = [(q.question, q.long) for q in (qa_reasoning(scene, rng) for _ in range(rng.randint(1, 2)))]
    else:
        raise ValueError(kind)
    return {"id": f"{scene.id}-{kind}", "image": image, "conversations": _dedupe(pairs)}


def _dedupe(pairs: list[tuple[str, str]]) -> list[dict]:
    seen, kept = set(), []
    for q, a in pairs:
        if q not in seen:
            seen.add(q)
            kept.append((q, a))
    return _turns(kept)


def eval_question(scene: Scene, image: str, rng: random.Random, kind: str, qid: str) -> dict:
    """One record of the evaluation JSONL (LLaVA's question-file shape plus the reference answer and kind)."""
    maker = {KIND_COLOR: qa_color, KIND_SHAPE: qa_shape, KIND_COUNT: qa_count, KIND_YESNO: qa_exists, KIND_CHOICE: qa_choice}[kind]
    qa = maker(scene, rng)
    record = {"question_id": qid, "image": image, "text": short_prompt(qa), "answer": qa.short, "kind": kind}
    if qa.choices:
        record["choices"] = qa.choices
    return record


def facts(scene: Scene, rng: random.Random) -> str:
    """Two facts about each shape, in random order, each naming the shape by one property and stating another:
    "The color of the star is red. The red shape is a star. The shape in the top left corner is a large red
    star." Each says which property comes before it names it ("The star is" could go on with a colour or a
    place; "The color of the star is" only with a colour), so the answer is a lookup, not a guess.

    After the patch words every fact is a lookup (find the patch with this kind, read its colour), the one
    a colour or shape question needs, but with the name one token before the answer instead of a dozen; the
    language model learns the lookup from these first, then uses it for questions.

    A lookup is learnt where the word that finds the shape is followed at once by what it finds. English
    always says "red star", which teaches the lookup by colour; so each shape whose kind is unique also gets
    "The star red is in the top left corner.", and each scene an existence question and a colour question,
    each answered at once ("Is there a red cross? No. What color is the star? Red."). Without the first,
    "What color is the star?" stayed near the rate of naming any colour on the grid (`python -m
    train.miniature.probe --ask both --threads 1`, step 450: colour 46% -> 92%, shape 93% -> 95%); with it
    but without the questions, the full recipe's yes/no fell from 93% to 79% (every miss a yes to a colour
    and kind not together in the picture). The colour question then took the full recipe's colour from 92%
    to 94% and multiple choice from 18% to 60%, for 4 points of yes/no (98% -> 94%)."""
    sentences = []
    for s in rng.sample(scene.shapes, len(scene.shapes)):
        options = [f"The shape {WHERE[s.cell]} is {_noun_phrase(s)}."]
        if scene.count(kind=s.kind) == 1:
            options += [f"The color of the {s.kind} is {s.color}.", f"The {s.kind} is {WHERE[s.cell]}."]
        if scene.count(color=s.color) == 1:
            options += [f"The {s.color} shape is {_article(s.kind)} {s.kind}.", f"The {s.color} shape is {s.size}."]
        if scene.count(kind=s.kind, color=s.color) == 1:
            options.append(f"The {s.color} {s.kind} is {WHERE[s.cell]}.")
        sentences += rng.sample(options, min(2, len(options)))
        if scene.count(kind=s.kind) == 1:
            sentences.append(f"The {s.kind} {s.color} is {WHERE[s.cell]}.")
    for qa in (qa_exists(scene, rng), qa_color(scene, rng)):
        sentences.append(f"{qa.question} {_cap(qa.short)}.")
    return " ".join(rng.sample(sentences, len(sentences)))


def place_list(scene: Scene, rng: random.Random) -> str:
    """Every shape by its place, in random order: "Places: top left red star, center blue circle."

    After the patch words this is the lookup by place alone, each place word one token before what it finds.
    The probe trained on it first (`python -m train.miniature.probe --place-steps 300 --steps 450`, which then
    keeps 1 row in 10 a place list) answers colour and shape questions that name the shape by its place at
    93% and 82% instead of 59% and 65%, and by kind or colour at 99% and 97% instead of 91% and 95%. The same
    in the recipe (300 steps on 3000 place lists, then 1 document in 10 a place list) cost the demo model
    colour (94% -> 64%), yes/no (94% -> 59%) and multiple choice (60% -> 16%) on the first 100 held-out
    questions, as every place list tried in its text did, six attention heads included (150 steps on 6,000
    lists, then 3 rows in 32: colour 66%, yes/no 75%, multiple choice 26%): the recipe does not use it."""
    return "Places: " + ", ".join(f"{POSITION[s.cell]} {s.color} {s.kind}" for s in rng.sample(scene.shapes, len(scene.shapes))) + "."


def place_question_document(scene: Scene, rng: random.Random) -> str:
    """A colour or shape question that names its shape by place, asked and answered as a one-turn vicuna_v1
    conversation (no system prompt) about the scene's patch words: "USER: <patch words>\nWhat color is the
    shape in the top left corner?\nAnswer the question using a single word or phrase. ASSISTANT: red</s>".

    The lookup by place (find the patch whose place the question names, read its colour or kind) does not
    form from the usual text, where these are about one question in twelve. As the language model's first phase
    (`--lm-phases places:...`) it forms within 150 steps from text, but the demo model it gives is worse
    on pictures (docs/demo-model.md), so the recipe does not use them by default."""
    from llavacli.prompts import Turn, get_template

    qa = qa_color(scene, rng, by_place=True) if rng.random() < 0.5 else qa_shape(scene, rng, by_place=True)
    template = get_template("vicuna_v1")
    return template.render([Turn(grid_text(scene) + "\n" + short_prompt(qa), 0, qa.short)])[len(template.opening()) :]


def is_facts_document(doc: str) -> bool:
    """Whether a language-model document is patch words followed by facts (lm_document's third kind)."""
    grid, _, rest = doc.partition("\n")
    words = grid.split(" ")
    return bool(rest) and len(words) == PATCHES * PATCHES and set(words) <= PATCH_WORDS | {EMPTY} and "ASSISTANT:" not in rest


def lm_document(scene: Scene, rng: random.Random) -> str:
    """Text the language model is pre-trained on, shaped like what stages 1 and 2 will show it.

    - prose (1 in 10): a caption and a detailed description;
    - stage-1 shape (1 in 10): the scene's patch words (grid_text), then its caption, as `plain` renders an
      image and its caption;
    - facts (7 in 20): the patch words, then facts that each look one shape up, and two questions answered
      at once (`facts`);
    - stage-2 shape (9 in 20): a vicuna_v1 conversation (half of them without the system prompt) with the
      patch words where the image will be, then questions of every kind answered (short answers with LLaVA's
      suffixes, or sentences).
    """
    from llavacli.prompts import Turn, get_template

    r = rng.random()
    if r < 0.1:
        return caption(scene, rng) + " " + description(scene)
    if r < 0.2:
        return grid_text(scene) + " " + caption(scene, rng) + "\n"
    if r < 0.55:
        return grid_text(scene) + "\n" + facts(scene, rng)
    maker_pool = SHORT_MAKERS + CHAT_MAKERS + [qa_reasoning]
    turns = []
    for i in range(rng.randint(3, 6)):
        if i == 0 and rng.random() < 0.1:
            qa = QA(rng.choice(Q_DETAIL), "", description(scene), "detail")
        else:
            qa = rng.choice(maker_pool)(scene, rng)
        short = rng.random() < 0.7 and qa.kind not in ("reasoning", "detail")
        text = short_prompt(qa) if short else qa.question
        if i == 0:
            text = grid_text(scene) + "\n" + text
        turns.append(Turn(text, 0, qa.short if short else qa.long))
    template = get_template("vicuna_v1")
    text = template.render(turns)
    if rng.random() < 0.5:  # half without the system prompt: it is the same every time, and costs a fifth
        text = text[len(template.opening()) :]
    return text


# ---------------------------------------------------------------------------------------------------------------
# Writing a dataset


@dataclass(frozen=True)
class Sizes:
    """How much of everything one run makes."""

    train_images: int = 6000
    test_images: int = 300
    stage1_per_image: int = 1
    stage1_facts: float = 0.0  # share of the stage-1 pairs whose text is the scene's facts, not a brief caption
    stage2_per_image: int = 1
    eval_per_kind: int = 250
    lm_documents: int = 30000
    lm_easy: float = 0.3  # share of the language model's documents whose scenes have one or two shapes
    lm_place_questions: int = 8000  # by-place questions (place_question_document), a first phase of the language model


def dataset_paths(out: Path) -> dict[str, Path]:
    return {
        "images": out / "images",
        "stage1": out / "stage1.json",
        "stage2": out / "stage2.json",
        "test_stage2": out / "test-stage2.json",
        "eval": out / "eval" / "questions.jsonl",
        "lm": out / "lm.txt",
        "lm_places": out / "lm-places.txt",
    }


def write_dataset(out: Path, sizes: Sizes = Sizes(), seed: int = 0, progress=None) -> dict[str, Path]:
    """Render the pictures and write every file the recipe reads; returns their paths.

    out/images/{train,test}/NNNNN.png, out/scenes-{train,test}.jsonl, out/stage1.json, out/stage2.json,
    out/test-stage2.json (held-out conversations), out/eval/questions.jsonl (image paths relative to the
    file's folder), out/lm.txt and out/lm-places.txt (one document per line, newlines escaped as \\n).
    """
    out.mkdir(parents=True, exist_ok=True)
    paths = dataset_paths(out)
    scenes: dict[str, list[Scene]] = {}
    for split, n in (("train", sizes.train_images), ("test", sizes.test_images)):
        folder = paths["images"] / split
        folder.mkdir(parents=True, exist_ok=True)
        scenes[split] = []
        with open(out / f"scenes-{split}.jsonl", "w") as f:
            for i in range(n):
                scene = make_scene(scene_rng(seed, split, i), f"{split}-{i:05d}")
                render(scene).save(folder / f"{i:05d}.png", compress_level=3)
                f.write(json.dumps(scene.to_json()) + "\n")
                scenes[split].append(scene)
                if progress:
                    progress(1)

    def image_of(split: str, i: int) -> str:
        return f"{split}/{i:05d}.png"

    rng = random.Random(f"miniature/{seed}/text")
    stage1 = [stage1_sample(s, image_of("train", i), rng, sizes.stage1_facts) for _ in range(sizes.stage1_per_image) for i, s in enumerate(scenes["train"])]
    stage2 = [stage2_sample(s, image_of("train", i), rng) for _ in range(sizes.stage2_per_image) for i, s in enumerate(scenes["train"])]
    rng.shuffle(stage1)
    rng.shuffle(stage2)
    test2 = [stage2_sample(s, image_of("test", i), rng) for i, s in enumerate(scenes["test"])]
    for key, data in (("stage1", stage1), ("stage2", stage2), ("test_stage2", test2)):
        paths[key].write_text(json.dumps(data, indent=1))

    write_questions(paths["eval"], scenes["test"], sizes.eval_per_kind, seed, "../images/test")

    # text for the language model: documents about fresh scenes (no pictures needed); the first
    # `lm_easy` share of them shows one or two shapes (the language model's curriculum starts there)
    trng = random.Random(f"miniature/{seed}/lm")
    n_easy = int(sizes.lm_documents * sizes.lm_easy)
    with open(paths["lm"], "w") as f:
        for i in range(sizes.lm_documents):
            rng = scene_rng(seed, "lm", i)
            scene = make_scene(rng, f"lm-{i}", rng.randint(1, 2) if i < n_easy else None)
            f.write(lm_document(scene, trng).replace("\n", "\\n") + "\n")
    prng = random.Random(f"miniature/{seed}/lm-places")
    with open(paths["lm_places"], "w") as f:
        for i in range(sizes.lm_place_questions):
            scene = make_scene(scene_rng(seed, "lm-places", i), f"lm-places-{i}")
            f.write(place_question_document(scene, prng).replace("\n", "\\n") + "\n")
    return paths


def write_questions(path: Path, scenes: list[Scene], per_kind: int, seed: int, image_dir: str) -> None:
    """The held-out evaluation questions: each kind over the pictures, cycling through them (JSONL)."""
    rng = random.Random(f"miniature/{seed}/eval")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for kind in EVAL_KINDS:
            for j in range(per_kind):
                i = (j * 7 + EVAL_KINDS.index(kind)) % len(scenes)
                qid = f"{kind.replace('/', '').replace(' ', '-')}-{j:04d}"
                f.write(json.dumps(eval_question(scenes[i], f"{image_dir}/{i:05d}.png", rng, kind, qid)) + "\n")


def write_heldout(out: Path, n_images: int, per_kind: int, seed: int = 0) -> Path:
    """Only the held-out pictures and their questions (the same as write_dataset's for the same seed and
    sizes): out/NNNNN.png and out/questions.jsonl. For checking a shipped model without the training data."""
    out.mkdir(parents=True, exist_ok=True)
    scenes = [make_scene(scene_rng(seed, "test", i), f"test-{i:05d}") for i in range(n_images)]
    for i, scene in enumerate(scenes):
        render(scene).save(out / f"{i:05d}.png", compress_level=3)
    write_questions(out / "questions.jsonl", scenes, per_kind, seed, ".")
    return out / "questions.jsonl"


def read_lm_documents(path: Path) -> list[str]:
    return [line.rstrip("\n").replace("\\n", "\n") for line in open(path) if line.strip()]


def load_scenes(out: Path, split: str) -> list[Scene]:
    scenes = []
    for line in open(out / f"scenes-{split}.jsonl"):
        d = json.loads(line)
        d["shapes"] = [Shape(**{**s, "cell": tuple(s["cell"])}) for s in d["shapes"]]
        d["tint"] = tuple(d["tint"])
        d["gradient"] = tuple(d["gradient"])
        d["jitter"] = [tuple(j) for j in d["jitter"]]
        scenes.append(Scene(**d))
    return scenes
