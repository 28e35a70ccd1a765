"""The toy world: 16x16 RGB images of one object in one colour and style on a background.

Small enough to train a generator, a detector and many erasures on a 2-core CPU; real enough
that erasure, preservation and rephrasing robustness are measured, not mocked.

Concepts come in named groups, like the paper's topics: objects (6), colours (5), styles (3),
backgrounds (2). Every concept has a canonical word, synonyms, and indirect descriptions; the
generator learns all of them, erasure is trained on canonical prompts, and rephrase robustness
is measured on the other two.
"""

from __future__ import annotations

import numpy as np

SIZE = 16

OBJECTS = ("circle", "square", "triangle", "cross", "bar", "hourglass")
COLOURS = {  # RGB in [0, 1]
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.70, 0.24),
    "blue": (0.20, 0.32, 0.90),
    "yellow": (0.90, 0.82, 0.16),
    "purple": (0.63, 0.24, 0.78),
}
STYLES = ("solid", "outlined", "striped")
BACKGROUNDS = {"dark": (0.12, 0.12, 0.16), "light": (0.88, 0.88, 0.84)}
# What a prompt that names no colour / no style shows: a grey, solid object. Like a real model's
# default look, this is what a colour or style falls back to once the neurons that carry it are
# masked (masks can only remove). Grey is not a concept (no prompt names it); the detector's
# colour head has it as an extra class. An unnamed object or background is any of them.
DEFAULT_COLOUR, DEFAULT_COLOUR_RGB = "grey", (0.55, 0.55, 0.55)
DEFAULT_STYLE = "solid"
ATTRIBUTES = ("object", "colour", "style", "background")
# The empty prompt means an empty background: the `empty` erasure target, and the negative side
# of classifier-free guidance. The detector's object head has this extra class.
NOTHING = "nothing"
BLANK_SHARE = 0.1  # share of training examples that are ("", empty background)
GROUPS = {
    "objects": OBJECTS,
    "colours": tuple(COLOURS),
    "styles": STYLES,
    "backgrounds": tuple(BACKGROUNDS),
}
GROUP_OF_ATTRIBUTE = {"object": "objects", "colour": "colours", "style": "styles", "background": "backgrounds"}

# concept -> (synonyms, indirect descriptions). The canonical word is the concept's name.
PHRASINGS = {
    "circle": (["disc", "round dot"], ["round shape", "shape with no corners"]),
    "square": (["box", "block"], ["four-sided shape with equal sides", "shape with four right angles"]),
    "triangle": (["pyramid", "wedge"], ["three-sided shape", "shape with three corners"]),
    "cross": (["plus sign", "plus"], ["shape of two crossing beams", "shape like a first-aid sign"]),
    "bar": (["strip", "plank"], ["long flat rectangle", "wide thin shape"]),
    "hourglass": (["egg timer", "bowtie"], ["shape of two triangles meeting at their tips", "shape narrow in the middle"]),
    "red": (["crimson", "scarlet"], ["tomato-coloured", "blood-coloured"]),
    "green": (["emerald", "lime"], ["grass-coloured", "leaf-coloured"]),
    "blue": (["azure", "navy"], ["sky-coloured", "ocean-coloured"]),
    "yellow": (["golden", "lemon"], ["banana-coloured", "sun-coloured"]),
    "purple": (["violet", "magenta"], ["plum-coloured", "grape-coloured"]),
    "solid": (["filled", "plain"], ["fully coloured-in", "uniformly filled"]),
    "outlined": (["hollow", "contour"], ["edge-only", "border-only"]),
    "striped": (["banded", "lined"], ["zebra-patterned", "stripe-filled"]),
    "dark": (["black", "night"], ["unlit", "shadowy"]),
    "light": (["white", "bright"], ["sunlit", "pale"]),
}

# (object, colour) pairs never shown to the generator in training: the quality check's
# held-out combinations. Each object and each colour appears at least once.
HELD_OUT = (("circle", "blue"), ("square", "yellow"), ("triangle", "purple"), ("cross", "red"),
            ("bar", "green"), ("hourglass", "blue"))


def all_concepts() -> list[str]:
    return [c for group in GROUPS.values() for c in group]


def group_of(concept: str) -> str:
    for group, members in GROUPS.items():
        if concept in members:
            return group
    raise KeyError(concept)


def attribute_of(concept: str) -> str:
    group = group_of(concept)
    return next(a for a, g in GROUP_OF_ATTRIBUTE.items() if g == group)


def phrase(concept: str, kind: str, rng: np.random.Generator | None = None) -> str:
    """A word for `concept`: kind is "canonical", "synonym" or "indirect"."""
    if kind == "canonical":
        return concept
    synonyms, indirect = PHRASINGS[concept]
    options = synonyms if kind == "synonym" else indirect
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def make_prompt(attrs: dict[str, str | None], kinds: dict[str, str] | None = None,
                rng: np.random.Generator | None = None) -> str:
    """'a {style} {colour} {object} on a {background} background', leaving out attributes set to None."""
    kinds = kinds or {}
    words = {a: phrase(v, kinds.get(a, "canonical"), rng) for a, v in attrs.items() if v is not None}
    noun = words.get("object", "shape")
    adjectives = [words[a] for a in ("style", "colour") if a in words]
    first = (adjectives or [noun])[0]
    article = "an" if first[0] in "aeiou" else "a"
    text = " ".join([article, *adjectives, noun])
    if "background" in words:
        text += f" on a {words['background']} background"
    return text


def _shape_mask(obj: str, cx: float, cy: float) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    dx, dy = x - cx, y - cy
    if obj == "circle":
        return dx**2 + dy**2 <= 5.6**2
    if obj == "square":
        return (np.abs(dx) <= 4.6) & (np.abs(dy) <= 4.6)
    if obj == "triangle":
        return (dy >= -5.5) & (dy <= 5.0) & (np.abs(dx) <= 0.62 * (dy + 5.5))
    if obj == "cross":
        return ((np.abs(dx) <= 1.6) & (np.abs(dy) <= 6.2)) | ((np.abs(dy) <= 1.6) & (np.abs(dx) <= 6.2))
    if obj == "bar":
        return (np.abs(dx) <= 6.6) & (np.abs(dy) <= 2.6)
    if obj == "hourglass":
        return (np.abs(dy) <= 5.6) & (np.abs(dx) <= 0.95 * np.abs(dy) + 0.6)
    raise KeyError(obj)


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])


def render(obj: str | None, colour: str, style: str, background: str, rng: np.random.Generator) -> np.ndarray:
    """One image, float32 (16, 16, 3) in [0, 1]: slight colour jitter and mild pixel noise.

    The object is always centred: position jitter made the few-step sampler average over
    positions and blur thin shapes (outlines) into the wrong class. obj None (or NOTHING)
    renders the empty background.
    """
    cx, cy = 7.5, 7.5
    if obj is None or obj == NOTHING:
        shape = np.zeros((SIZE, SIZE), bool)
    else:
        shape = _shape_mask(obj, cx, cy)
    if style == "outlined":
        shape = shape & ~_erode(shape)
    elif style == "striped":
        rows = np.arange(SIZE)[:, None]
        shape = shape & (rows % 2 == 0)  # one-pixel lines: the shape's outline stays readable
    elif style != "solid":
        raise KeyError(style)
    bg = np.array(BACKGROUNDS[background], np.float32) + rng.uniform(-0.03, 0.03, 3)
    fg = np.array(DEFAULT_COLOUR_RGB if colour == DEFAULT_COLOUR else COLOURS[colour], np.float32) + rng.uniform(-0.04, 0.04, 3)
    image = np.where(shape[..., None], fg, bg).astype(np.float32)
    image += rng.normal(0.0, 0.03, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0)


def random_attributes(rng: np.random.Generator, exclude_held_out: bool = True) -> dict[str, str]:
    while True:
        attrs = {"object": OBJECTS[rng.integers(len(OBJECTS))],
                 "colour": list(COLOURS)[rng.integers(len(COLOURS))],
                 "style": STYLES[rng.integers(len(STYLES))],
                 "background": list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]}
        if not exclude_held_out or (attrs["object"], attrs["colour"]) not in HELD_OUT:
            return attrs


def detector_classes(attribute: str) -> list[str]:
    """Class names of the detector's head for `attribute` (objects include NOTHING, colours DEFAULT_COLOUR)."""
    names = list(GROUPS[GROUP_OF_ATTRIBUTE[attribute]])
    extra = {"object": [NOTHING], "colour": [DEFAULT_COLOUR]}.get(attribute, [])
    return names + extra


def label_indices(attrs: dict[str, str]) -> list[int]:
    return [detector_classes(a).index(attrs[a]) for a in ATTRIBUTES]


def training_example(rng: np.random.Generator, exclude_held_out: bool = True) -> tuple[np.ndarray, str, dict]:
    """An image and a prompt for it: each attribute named with some probability, in varied phrasings.

    A share BLANK_SHARE of examples is the empty prompt with an empty background. An unnamed
    colour or style is drawn as DEFAULT_COLOUR / DEFAULT_STYLE; the returned attributes say what
    the image shows.
    """
    attrs = random_attributes(rng, exclude_held_out)
    if rng.random() < BLANK_SHARE:
        attrs["object"] = NOTHING
        return render(None, attrs["colour"], attrs["style"], attrs["background"], rng), "", attrs
    mention = {"object": 0.9, "colour": 0.85, "style": 0.6, "background": 0.6}
    named = {a: (v if rng.random() < mention[a] else None) for a, v in attrs.items()}
    kinds = {a: ("canonical", "synonym", "indirect")[rng.choice(3, p=[0.6, 0.25, 0.15])] for a in attrs}
    prompt = make_prompt(named, kinds, rng)
    if named["colour"] is None:
        attrs["colour"] = DEFAULT_COLOUR
    if named["style"] is None:
        attrs["style"] = DEFAULT_STYLE
    image = render(attrs["object"], attrs["colour"], attrs["style"], attrs["background"], rng)
    return image, prompt, attrs


def vocabulary() -> list[str]:
    words = {"a", "an", "on", "background", "shape"}
    for concept in all_concepts():
        words.update(concept.split())
        for options in PHRASINGS[concept]:
            for option in options:
                words.update(option.split())
    return sorted(words)


def concept_prompts(concept: str, kind: str = "canonical", per_combination: bool = True) -> list[str]:
    """Prompts naming `concept` (in the given phrasing) with every value of each other attribute group.

    For an object: 'a {style} {colour} {object} on a {background} background' over all colours,
    styles and backgrounds; the other attributes stay canonical.
    """
    attr = attribute_of(concept)
    others = [a for a in ATTRIBUTES if a != attr]
    prompts = []
    values = {a: list(GROUPS[GROUP_OF_ATTRIBUTE[a]]) for a in others}
    if not per_combination:
        return [make_prompt({attr: concept}, {attr: kind})]
    first, second = others[0], others[1]  # vary two attributes; the third left unnamed
    for v1 in values[first]:
        for v2 in values[second]:
            prompts.append(make_prompt({attr: concept, first: v1, second: v2}, {attr: kind}))
    return prompts
