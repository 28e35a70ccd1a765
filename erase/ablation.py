"""What the mask sites can reach at all: the toy generator with whole site groups removed.

    python -m erase.ablation [--seeds 2] [--json]

Generates every (object, colour, style) prompt of the toy world with a group of mask sites set
to zero (every unit of it removed at once, the most any mask over those sites can remove) and
prints the share of generations in which the detector still finds the prompted object, colour
and style (and the style on the prompts whose style is not the default look, solid, which a
removed style falls back to). A concept whose detection survives the removal of every unit a mask may touch
cannot be erased by such a mask without a different generator or other sites. Two more rows
zero layers of the text encoder, which no mask site covers, to show where the colour's way in
runs. docs/toy_world.md records one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch

from erase.evaluate import rate
from erase.masks import MaskHooks
from erase.pipelines import load_generator
from erase.pipelines import toy_world as world
from erase.pipelines.toy import load_detector
from erase.sampler import sample

# name -> which sites are removed (all entries zero); the rest stay whole
ABLATIONS = {
    "none": lambda site: False,
    "ffn (image stream)": lambda site: site.group == "ffn" and site.name.endswith(".ff"),
    "ffn (text stream)": lambda site: site.group == "ffn" and site.name.endswith(".ff_context"),
    "norm": lambda site: site.group == "norm",
    "ffn + norm (the default sites)": lambda site: site.group in ("ffn", "norm"),
    "attn, every head": lambda site: site.group == "attn",
}
# Outside the transformer, so outside every mask site of the method: the toy text encoder's own
# layers (FLUX.1's T5 in miniature), zeroed to see where the colour word's way in runs.
# name -> suffixes of the text encoder's linear layers whose weights and biases are zeroed
TEXT_ENCODER_ABLATIONS = {
    "text encoder: every self-attention output": ("self_attn.out_proj",),
    "text encoder: every FFN output": ("linear2",),
}


@contextlib.contextmanager
def zeroed(module: torch.nn.Module, suffixes: tuple[str, ...]):
    """Zero the weights and biases of the submodules whose names end with one of `suffixes`; restore them after."""
    saved = {name: param.detach().clone() for name, param in module.named_parameters()
             if any(("." + name.rsplit(".", 1)[0]).endswith("." + suffix) for suffix in suffixes)}
    if not saved:
        raise ValueError(f"no parameters of {type(module).__name__} end with {suffixes}")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name in saved:
            params[name].zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


@torch.no_grad()
def detection_with_removed(gen, detector, remove, seeds_per_prompt: int = 2) -> dict[str, dict]:
    """Share of generations whose object, colour and style the detector finds as prompted, each
    with its 95% interval and n ({value, n, low, high})."""
    combos = [(o, c, s) for o in world.OBJECTS for c in world.COLOURS for s in world.STYLES]
    combos = [combo for combo in combos for _ in range(seeds_per_prompt)]
    prompts = [world.make_prompt({"object": o, "colour": c, "style": s}) for o, c, s in combos]
    sites = gen.mask_sites()
    values = {site.name: torch.zeros(site.size) for site in sites if remove(site)}
    cond = gen.encode(prompts)
    noise = gen.noise([10_000_000 + i for i in range(len(prompts))])
    with MaskHooks(gen.transformer, sites, values):
        final = sample(lambda x, sigma: gen.velocity(x, sigma, cond), noise, gen.sigmas(gen.default_steps), False)
    found = detector.predict(gen.decode(final))
    rates = {attr: rate([f[attr] == combo[i] for f, combo in zip(found, combos)])
             for i, attr in enumerate(("object", "colour", "style"))}
    # A removed style falls back to the default look (solid), which is the prompted style of a
    # third of the prompts: the style column cannot fall below 1/3 however much is removed. This
    # one counts the other styles only, where the fallback is a miss.
    styled = [(f, combo) for f, combo in zip(found, combos) if combo[2] != world.DEFAULT_STYLE]
    rates["style_not_default"] = rate([f["style"] == combo[2] for f, combo in styled])
    return rates


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erase.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="starting noises per prompt (90 prompts)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--model-path", default=None,
                        help="a folder written by `python -m erase.toy_train --out` (default: the shipped weights)")
    args = parser.parse_args(argv)
    gen, detector = load_generator("toy", args.model_path), load_detector(args.model_path)
    rows = {name: detection_with_removed(gen, detector, remove, args.seeds) for name, remove in ABLATIONS.items()}
    for name, suffixes in TEXT_ENCODER_ABLATIONS.items():
        with zeroed(gen.text_encoder, suffixes):
            rows[name] = detection_with_removed(gen, detector, ABLATIONS["none"], args.seeds)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("object", "colour", "style", "style_not_default")
    first = rows["none"]
    print(f"share of generations with the prompted attribute found, 95% interval; n {first['object']['n']} "
          f"({first['style_not_default']['n']} for style (not solid))")
    print(f"{'removed':44s} {'object':>17s} {'colour':>17s} {'style':>17s} {'style (not solid)':>18s}")
    for name, row in rows.items():
        cells = [f"{row[c]['value']:.2f} [{row[c]['low']:.2f}, {row[c]['high']:.2f}]" for c in columns]
        print(f"{name:44s} " + " ".join(f"{cell:>17s}" for cell in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
