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
    return compose({a: phrase(v, kinds.get(a, "canonical"), rng) for a, v in attrs.items() if v is not None})


def compose(words: dict[str, str]) -> str:
    """The prompt of the generator's template from the words chosen for the named attributes."""
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


# ---------------------------------------------------------------- prompt splits and robustness families
# Erasure trains on one part of a concept's prompts, a sweep selects (and ASHA stops) on a second,
# and `erase eval` and the promotion gates report on a third, so that no figure is measured on a
# prompt the mask was trained or selected on. A concept's prompts are every way the generator was
# taught to be prompted with it: each subset of the other attributes named ("a striped circle",
# "a striped red shape on a dark background", "a striped shape"), every value of those, and the
# concept in its canonical word, each synonym and each description. A prompt's split is set by
# its text and SPLIT_SEED alone, so a prompt that names two concepts has one split for both.
SPLIT_SEED = 0  # the world's seed (toy_train --seed 0)
SPLITS = ("train", "validation", "test")
SPLIT_SHARES = {"train": 0.5, "validation": 0.25}  # of the prompts outside the held-out family; the rest: test
# The held-out template family: prompts that name all four attributes, the generator's full
# template ("a striped red circle on a dark background"). Erasure never trains or selects on it.
HELD_OUT_FAMILY = "every attribute named"
PER_OTHER_CONCEPT = {"validation": 12, "test": 24}  # plain prompts of each concept not erased (preservation)
PER_FAMILY = 24  # prompts per robustness family and of the rephrasings


def phrasings(concept: str) -> list[tuple[str, str]]:
    """(kind, word) for the canonical word, every synonym and every description of `concept`."""
    synonyms, indirect = PHRASINGS[concept]
    return [("canonical", concept), *[("synonym", w) for w in synonyms], *[("indirect", w) for w in indirect]]


def concept_universe(concept: str) -> list[dict]:
    """Every prompt naming `concept` the way the generator was trained: {prompt, kind, family, attrs}."""
    import itertools

    attribute = attribute_of(concept)
    others = [a for a in ATTRIBUTES if a != attribute]
    out = []
    for size in range(len(others) + 1):
        for named in itertools.combinations(others, size):
            family = HELD_OUT_FAMILY if size == len(others) else "+".join((attribute, *named))
            for values in itertools.product(*(GROUPS[GROUP_OF_ATTRIBUTE[a]] for a in named)):
                attrs = {a: None for a in ATTRIBUTES} | dict(zip(named, values)) | {attribute: concept}
                for kind, word in phrasings(concept):
                    words = {a: v for a, v in attrs.items() if v is not None} | {attribute: word}
                    out.append({"prompt": compose(words), "kind": kind, "family": family, "attrs": attrs})
    return out


def split_of(prompt: str) -> str:
    """The split of a prompt: "test" for the held-out family, else set by a hash of SPLIT_SEED and its text."""
    import zlib

    named = sum(1 for a in ATTRIBUTES if _names_attribute(prompt, a))
    if named == len(ATTRIBUTES):
        return "test"
    u = zlib.crc32(f"{SPLIT_SEED}:{prompt}".encode()) / 2**32
    if u < SPLIT_SHARES["train"]:
        return "train"
    return "validation" if u < SPLIT_SHARES["train"] + SPLIT_SHARES["validation"] else "test"


def _names_attribute(prompt: str, attribute: str) -> bool:
    """Whether `prompt` names a value of `attribute` in any phrasing (the object: not just 'shape')."""
    text = f" {prompt} "
    return any(f" {word} " in text for concept in GROUPS[GROUP_OF_ATTRIBUTE[attribute]]
               for _, word in phrasings(concept))


def split_prompts(concept: str, split: str, kinds: tuple[str, ...] = ("canonical", "synonym", "indirect"),
                  n: int | None = None) -> list[str]:
    """The prompts of `concept` in `split` whose phrasing is one of `kinds`; with `n`, a fixed sample of n."""
    if split not in SPLITS:
        raise KeyError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")
    prompts = [p["prompt"] for p in concept_universe(concept) if p["kind"] in kinds and split_of(p["prompt"]) == split]
    return _sample(prompts, n, f"{concept}:{split}:{','.join(kinds)}")


def _sample(prompts: list[str], n: int | None, salt: str) -> list[str]:
    import zlib

    if n is None or len(prompts) <= n:
        return prompts
    rng = np.random.default_rng([SPLIT_SEED, zlib.crc32(salt.encode())])
    return [prompts[i] for i in sorted(rng.choice(len(prompts), n, replace=False))]


# Robustness families: forms of a prompt that the generator still draws the concept from, but that
# no erasure prompt has (and so no mask was trained on): each is built from the test split's plain
# prompts of the concept and reported as its own figure in `erase eval`, and pooled as
# robust_erasure_rate. The README's "Prompt splits and robustness families" lists the same families.
def _repeated(prompt: str, concept: str, rng) -> str:
    return prompt.replace(f" {concept} ", f" {concept} {concept} ", 1)


def _synonym_beside(prompt: str, concept: str, rng) -> str:
    synonyms = PHRASINGS[concept][0]
    return prompt.replace(f" {concept} ", f" {concept} {synonyms[int(rng.integers(len(synonyms)))]} ", 1)


def _bare(prompt: str, concept: str, rng) -> str:
    return concept


def _extra_attributes(prompt: str, concept: str, rng) -> str:
    """The concept with a background and a second style named (an object or colour: with two styles)."""
    styles = [s for s in STYLES if s != concept]
    style = styles[int(rng.integers(len(styles)))]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    text = prompt.split(" on a ")[0]
    words = text.split()
    words.insert(1 if words[0] in ("a", "an") else 0, style)
    article = "an" if words[1][0] in "aeiou" else "a"
    return " ".join([article, *words[1:]]) + f" on a {background} background"


def _comma_list(prompt: str, concept: str, rng) -> str:
    words = [w for w in prompt.replace(" background", "").replace(" on a ", " ").split() if w not in ("a", "an")]
    return ", ".join(words)


ROBUSTNESS_FAMILIES = {
    "repeated": (_repeated, "the concept word twice ('a striped striped red circle')"),
    "synonym_beside": (_synonym_beside, "a synonym next to the canonical word ('a striped banded red circle')"),
    "bare": (_bare, "the concept word alone ('striped')"),
    "extra_attributes": (_extra_attributes, "a second style and a background ('an outlined striped red circle on "
                                            "a dark background')"),
    "comma_list": (_comma_list, "the words as a comma list without articles ('striped, red, circle')"),
}


def robustness_prompts(concept: str, family: str, split: str = "test", n: int = PER_FAMILY) -> list[str]:
    """Prompts of robustness `family` for `concept`, from its plain prompts in `split` (distinct, up to n)."""
    import zlib

    build, _ = ROBUSTNESS_FAMILIES[family]
    rng = np.random.default_rng([SPLIT_SEED, zlib.crc32(f"{concept}:{family}".encode())])
    base = [f" {p} " for p in split_prompts(concept, split, ("canonical",))]
    built = list(dict.fromkeys(" ".join(build(p, concept, rng).split()) for p in base))
    # a family with fewer distinct prompts than n (the bare word: one) repeats them, each with its own seeds
    return _sample(built, n, f"{concept}:{split}:{family}") if len(built) >= n else (built * n)[:n]
