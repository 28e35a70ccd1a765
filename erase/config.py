"""One run's settings, resolved once.

A run is a `TrainConfig`. `resolve` builds it from layers, each overriding the ones before:

    1. TrainConfig's own defaults           the paper's, for FLUX.1 (docs/method.md)
    2. the model's recipe defaults          e.g. the toy world's beta 0.25, 200 steps, 4 noises
    3. a named recipe of the model          `recipe: NAME` in a config file or a space, or --recipe
    4. a config file, or a space's fixed    the same keys either way (`erase train --config FILE`)
    5. the values a sweep samples           one trial's draw from the space's `search:`
    6. the user's flags                     only the flags given on the command line

Every value is checked as its layer comes in (an unknown key or a wrong type names the layer
and the key), and the result is validated once, before any model is loaded. `erase train`'s
flags are generated from the fields below (`add_flags`), so their defaults and help are the
ones the run reads.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field

from erase.errors import EraseError
from erase.masks import PARAMETRISATIONS
from erase.pipelines import SITE_GROUPS

TARGETS = ("empty", "substitute", "adaptive", "edit")
MASK_NOISE = ("per_step", "per_call")
OPTIMIZERS = ("adam", "adamw")
MAX_NOISES_PER_PROMPT = 64


class ConfigError(EraseError):
    """A run's settings cannot work; the message names the setting (and where it came from) and the fix."""


def setting(default, help: str, **flag):
    """A TrainConfig field with its --help text and how its flag looks (`flag`: see `add_flags`)."""
    metadata = {"help": help, **flag}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    concept: str
    sites: tuple[str, ...] = setting(("ffn", "norm"), f"site groups to mask, comma-separated from {','.join(SITE_GROUPS)}",
                                     parse=lambda text: tuple(g.strip() for g in text.split(",") if g.strip()),
                                     metavar="GROUPS")
    parametrisation: str = setting("hard_concrete", "how logits become masks while training: hard-concrete noise "
                                   "(the paper's), sigmoid, or binary with a straight-through gradient",
                                   choices=PARAMETRISATIONS)
    init_logit: float = setting(3.0, "initial mask logit λ (3: mask ≈ 1, every unit kept)")
    target: str = setting("empty", "what the concept maps onto: the empty prompt's output, a substituted prompt's, "
                          "a learnt mixture of its nearest concepts (AGE), or the concept's own image edited with "
                          "FlowEdit towards the substituted prompt (the reference code's)", choices=TARGETS,
                          default_text="empty; for a toy colour or style, substitute with the word dropped "
                          "('a blue circle' -> 'a circle', drawn grey); for a toy object or background, adaptive")
    substitutions: dict[str, str] = setting({}, "for --target substitute or edit: replace OLD in each concept prompt by NEW "
                                            "(repeatable), e.g. 'Van Gogh=a painter'", flag="--substitute",
                                            metavar="OLD=NEW", append=True, default_text="none")
    # the edit target (erase/flowedit.py): the original model's image of the concept prompt, edited with
    # FlowEdit towards the substituted prompt, by the model itself or another one of the same latent space
    edit_model: str | None = setting(None, "edit: the model that edits (a model name of the same latent space, "
                                     "e.g. flux.1-dev for flux.1-schnell)", default_text="the model itself")
    edit_steps: int | None = setting(None, "edit: steps of FlowEdit's schedule", default_text="the editing model's "
                                     "sampling steps")
    edit_strength: float = setting(0.85, "edit: the share of the schedule edited; the steps before it are skipped, "
                                   "which keeps the source's layout (FlowEdit's 24 of 28 steps on FLUX.1)")
    edit_average: int = setting(1, "edit: fresh noises averaged in each edit step")
    # the adaptive target (erase/adaptive.py): k nearest candidates from a vocabulary, Gumbel-softmax
    # temperature, hard (straight-through) or soft top-k mixture, the candidates' logits' learning rate
    # (gradient ascent), and the weight λ of the target's preservation term
    adaptive_k: int = setting(8, "adaptive: candidate concepts (nearest in text embedding)")
    adaptive_temperature: float = setting(1.0, "adaptive: Gumbel-softmax temperature")
    adaptive_hard: bool = setting(True, "adaptive: a soft top-k mixture instead of the hard straight-through "
                                  "one-hot", flag="--adaptive-soft", default_text="hard")
    adaptive_top_k: int = setting(3, "adaptive, soft: the mixture weights kept")
    adaptive_lr: float = setting(1e-2, "adaptive: learning rate of the candidates' logits")
    adaptive_lambda: float = setting(1.0, "adaptive: weight of the target's preservation term")
    vocabulary: str | None = setting(None, "adaptive: candidate concepts, a file (one per line) or a comma-separated "
                                     "list", default_text="the model's own, where it has one (toy: the other "
                                     "concepts of the erased one's group; FLUX.1 has none, pass it)")
    beta: float = setting(0.01, "weight of the preservation term (smaller: stronger erasure; the toy recipe "
                          "gives a colour 2, an object 0.1)")
    lr_ffn: float = setting(0.5, "learning rate of the FFN masks' logits")
    lr_norm: float = setting(0.5, "learning rate of the text-stream modulation (norm) masks' logits")
    lr_attn: float = setting(0.0, "learning rate of the attention-head masks' logits; 0 leaves heads unmasked "
                             "(the paper's default)")
    optimizer: str = setting("adamw", "optimizer of the mask logits", choices=OPTIMIZERS)
    weight_decay: float = setting(1e-2, "the optimizer's weight decay on the logits")
    steps: int = setting(400, "optimisation steps")
    batch_size: int = setting(4, "prompts per term per optimisation step")
    grad_accum: int = setting(1, "batches per optimisation step, their gradients accumulated")
    micro_batch: int | None = setting(None, "samples per forward and backward within a batch, the batch's gradient "
                                      "accumulated over them (less memory, the same gradient)",
                                      default_text="the whole batch at once")
    sampling_steps: int | None = setting(None, "sampling steps unrolled in every forward", default_text="the model's")
    noises_per_prompt: int = setting(1, "fixed starting noises per prompt")
    shared_noise: bool = setting(False, "one starting noise shared by every sample of both terms (the reference "
                                 "code's), instead of fixed noises per prompt", default_text="noises per prompt")
    mask_noise: str = setting("per_step", "hard-concrete noise: drawn once per optimisation step for every hook "
                              "call of both terms, or anew at every hook call (the reference code's)",
                              choices=MASK_NOISE)
    text_length: int | None = setting(None, "text tokens per prompt (FLUX.1's T5 sequence length)",
                                      default_text="the model's: 256 for flux.1-schnell, 512 for flux.1-dev")
    # Explicit sparsity control on the smooth removed share 1 - mean(sigmoid(λ)):
    # weight * removed (L1), or weight * max(0, removed - target_sparsity) (a budget).
    sparsity_weight: float = setting(0.0, "weight of the explicit sparsity penalty (0: none)")
    target_sparsity: float | None = setting(None, "with --sparsity-weight: penalise only the removed share above this "
                                            "budget", default_text="none, every removed unit is penalised (L1)")
    checkpointing: bool = setting(True, "plain full backprop instead of step-wise checkpointing (memory grows with "
                                  "the sampling steps)", flag="--no-checkpointing", default_text="checkpointed")
    block_checkpointing: bool = setting(False, "also checkpoint every transformer block within a step (diffusers' "
                                        "gradient checkpointing): one block's activations alive at a time, for one "
                                        "more forward of each block", default_text="off")
    threads: int | None = setting(None, "CPU threads of torch's intra-op pool for this run: float sums come out "
                                  "differently with another count, so a mask repeats bit for bit at the same one",
                                  default_text="torch's default (the cores); a sweep worker: its --cpus-per-worker")
    threshold: float = setting(0.0, "binarisation threshold: an entry is kept when its logit is above it")
    seed: int = setting(0, "seed of the starting noises, the batch order and the mask noise")
    log_every: int = 10  # steps between log rows (and a trial's reports); set by the caller, not a setting
    # Set by `resolve`: no layer chose micro_batch or block_checkpointing, so on a GPU a run takes the
    # planner's cheapest setting that fits (erase.trial.planned_memory); not a setting either.
    plan_memory: bool = False

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
            (self.threads is None or self.threads >= 1, f"threads must be at least 1, got {self.threads}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"gradient accumulation must be at least 1, got {self.grad_accum}"),
            (self.micro_batch is None or self.micro_batch >= 1, f"micro-batch must be at least 1, got {self.micro_batch}"),
            (self.target != "adaptive" or self.micro_batch is None or self.micro_batch >= self.batch_size,
             "the adaptive target runs each batch whole: drop --micro-batch (or make it the batch size)"),
            (1 <= self.noises_per_prompt <= MAX_NOISES_PER_PROMPT,
             f"noises per prompt must be in 1..{MAX_NOISES_PER_PROMPT}, got {self.noises_per_prompt}"),
            (self.beta >= 0, f"beta must be >= 0, got {self.beta}"),
            (min(self.lr_ffn, self.lr_norm, self.lr_attn) >= 0, "learning rates must be >= 0"),
            (self.sparsity_weight >= 0, f"sparsity weight must be >= 0, got {self.sparsity_weight}"),
            (self.target_sparsity is None or 0 <= self.target_sparsity < 1,
             f"target sparsity must be in [0, 1), got {self.target_sparsity}"),
            (self.target in TARGETS, f"unknown target {self.target!r}; use one of {', '.join(TARGETS)}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}"),
            (self.parametrisation in PARAMETRISATIONS,
             f"unknown parametrisation {self.parametrisation!r}; use one of {', '.join(PARAMETRISATIONS)}"),
            (self.target not in ("substitute", "edit") or bool(self.substitutions),
             f"target {self.target!r} needs a map: pass --substitute OLD=NEW (e.g. 'nude man=a man')"),
            (0 < self.edit_strength <= 1, f"edit strength must be in (0, 1], got {self.edit_strength}"),
            (self.edit_average >= 1, f"edit average must be at least 1, got {self.edit_average}"),
            (self.edit_steps is None or self.edit_steps >= 1, f"edit steps must be at least 1, got {self.edit_steps}"),
            (not self.shared_noise or self.noises_per_prompt == 1,
             "a shared starting noise is one noise: drop --noises-per-prompt (or --shared-noise)"),
            (self.mask_noise in MASK_NOISE, f"unknown mask noise {self.mask_noise!r}; use one of {', '.join(MASK_NOISE)}"),
            (self.mask_noise == "per_step" or self.parametrisation == "hard_concrete",
             f"mask noise per hook call needs the hard-concrete parametrisation ({self.parametrisation} has no noise)"),
            (self.text_length is None or self.text_length >= 1, f"text length must be at least 1, got {self.text_length}"),
            (self.adaptive_k >= 1 and self.adaptive_top_k >= 1, "adaptive k and top-k must be at least 1"),
            (self.adaptive_temperature > 0, f"adaptive temperature must be > 0, got {self.adaptive_temperature}"),
            (self.adaptive_lr >= 0 and self.adaptive_lambda >= 0, "adaptive lr and lambda must be >= 0"),
            (self.log_every >= 1, f"log_every must be at least 1, got {self.log_every}"),
        ]
        checks += [(g in SITE_GROUPS, f"site group {g!r} does not exist; choose from {', '.join(SITE_GROUPS)}")
                   for g in self.sites]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if all(self.lr(g) == 0 for g in self.sites):
            raise ConfigError(f"every selected site group ({', '.join(self.sites)}) has learning rate 0: "
                              "nothing would train")

    def lr(self, group: str) -> float:
        return {"ffn": self.lr_ffn, "norm": self.lr_norm, "attn": self.lr_attn}[group]


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# What a config file, a space (fixed or searched) or a named recipe may set: every field but the
# concept (given on its own) and log_every (the caller's), plus `recipe` (layer 3) in files.
SETTINGS = tuple(name for name in FIELDS if name not in ("concept", "log_every", "plan_memory"))
MEMORY_SETTINGS = ("micro_batch", "block_checkpointing")  # what the planner chooses unless a layer does
FILE_KEYS = SETTINGS + ("recipe",)
NOT_SEARCHABLE = ("seed", "noises_per_prompt", "shared_noise")  # they define the prompt streams, which a study builds once
_DEFAULTS = TrainConfig(concept="")
_HINTS = typing.get_type_hints(TrainConfig)


# ---------------------------------------------------------------- resolution


def resolve(model: str, concept: str, *, fixed: dict | None = None, sampled: dict | None = None,
            flags: dict | None = None, fixed_from: str = "fixed settings") -> TrainConfig:
    """The run's TrainConfig from the layers in the module doc, checked and validated.

    `fixed`: a config file's or a space's fixed settings (`fixed_from` names them in errors);
    `sampled`: a trial's draw; `flags`: what the user (or a calling program) set explicitly,
    which may also set `log_every`. A named recipe comes from `recipe` in `flags`, else in `fixed`.
    Substitutions serve the substitute and edit targets only: for any other target they are dropped.
    """
    from erase.pipelines import model as model_entry

    fixed, sampled, flags = dict(fixed or {}), dict(sampled or {}), dict(flags or {})
    flag_recipe, file_recipe = flags.pop("recipe", None), fixed.pop("recipe", None)
    recipe = flag_recipe or file_recipe
    values = checked(model_entry(model).recipe_defaults(concept), f"{model}'s recipe defaults")
    if recipe is not None:
        values.update(checked(recipe_settings(model, recipe), f"recipe {recipe!r} of {model}"))
    values.update(checked(fixed, fixed_from))
    values.update(checked(sampled, "the sampled values"))
    values.update(checked(flags, "the flags", SETTINGS + ("log_every",)))
    if values.get("target", TrainConfig.target) not in ("substitute", "edit"):
        values["substitutions"] = {}
    values["plan_memory"] = not set(MEMORY_SETTINGS) & set(values)
    cfg = TrainConfig(concept=concept, **values)
    cfg.validate()
    return cfg


def check_settings(model: str, settings: dict, where: str) -> None:
    """What can be checked of one layer alone (a space's fixed settings before any trial draws the
    rest): every key a setting, every value of its type, a named recipe one the model has."""
    settings = dict(settings)
    if "recipe" in settings:
        recipe_settings(model, settings.pop("recipe"))
    checked(settings, where)


def recipe_settings(model: str, name: str) -> dict:
    from erase.pipelines import model as model_entry

    recipes = model_entry(model).recipes
    if name not in recipes:
        raise ConfigError(f"{model} has no recipe {name!r}; its recipes: {', '.join(recipes) or 'none'}")
    return recipes[name]


def checked(layer: dict, where: str, allowed: tuple[str, ...] = SETTINGS) -> dict:
    """A layer's values as TrainConfig takes them; an unknown key or a wrong type names `where` it came from."""
    values = {}
    for key, value in layer.items():
        if key not in allowed:
            raise ConfigError(f"{where}: {key!r} is not a setting of a run; settings: {', '.join(allowed)}")
        values[key] = coerce(key, value, where)
    return values


def default_value(model: str, key: str, concept: str | None = None):
    """What `key` is for `model` before any recipe, file or flag: its recipe default, else TrainConfig's."""
    from erase.pipelines import recipe_defaults

    return recipe_defaults(model, concept).get(key, getattr(_DEFAULTS, key))


def read_config_file(path: str) -> dict:
    """A YAML config file's settings: a mapping of the keys a space's `fixed:` takes (checked by `resolve`)."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path}: not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings (key: value), got {type(raw).__name__}")
    return raw


def kind_of(key: str) -> tuple[type, bool]:
    """The type of the TrainConfig field `key` (int, float, bool, str, tuple or dict) and whether it may be None."""
    hint = _HINTS[key]
    optional = type(None) in typing.get_args(hint)
    if optional:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint, optional


def coerce(key: str, value, where: str):
    """`value` as the type of the TrainConfig field `key`, or a ConfigError that names `where` it came from."""
    kind, optional = kind_of(key)
    if value is None and optional:
        return None
    try:
        if kind in (bool, str) and isinstance(value, kind):
            return value
        if kind is bool and type(value).__name__ == "bool_":  # numpy's, from a sampler
            return bool(value)
        if kind in (int, float) and not isinstance(value, (bool, str, dict, list, tuple)):
            number = float(value)
            if kind is float:
                return number
            if number == int(number):
                return int(number)
        if kind is float and isinstance(value, str):
            return float(value)  # YAML reads 1e-5 (no dot) as a string
        if kind is tuple and isinstance(value, (str, list, tuple)):
            parts = value.split(",") if isinstance(value, str) else value
            return tuple(str(p).strip() for p in parts if str(p).strip())
        if kind is dict and isinstance(value, dict):
            return {str(k): "" if v is None else str(v) for k, v in value.items()}
    except (TypeError, ValueError):
        pass
    wanted = {int: "a whole number", float: "a number", bool: "true or false", str: "a string",
              tuple: "a comma-separated list", dict: "a mapping OLD: NEW"}[kind]
    raise ConfigError(f"{where}: {key!r} must be {wanted}, got {value!r}")


# ---------------------------------------------------------------- flags generated from the fields


def add_flags(parser) -> None:
    """One flag per setting, named after its field (or its `flag`), with its help and its default.

    Every flag defaults to None, meaning "not given": only the flags a user gives reach the
    flags layer. A bool setting's flag switches it away from its default (--no-checkpointing).
    """
    for name in SETTINGS:
        meta = FIELDS[name].metadata
        kwargs = {"dest": name, "default": None, "help": help_text(name)}
        kind, _ = kind_of(name)
        if kind is bool:
            kwargs.update(action="store_const", const=not FIELDS[name].default)
        elif meta.get("append"):
            kwargs.update(action="append", metavar=meta.get("metavar"))
        else:
            kwargs.update(type=meta.get("parse") or (kind if kind in (int, float) else str),
                          choices=meta.get("choices"), metavar=meta.get("metavar"))
        parser.add_argument(meta.get("flag") or "--" + name.replace("_", "-"), **kwargs)


def flag_values(args) -> dict:
    """The settings the user gave as flags (see `add_flags`), as TrainConfig values."""
    from erase.prompts import parse_substitutions

    given = {name: getattr(args, name) for name in SETTINGS if getattr(args, name, None) is not None}
    if "substitutions" in given:
        given["substitutions"] = parse_substitutions(given["substitutions"])
    return given


def help_text(name: str) -> str:
    """A setting's help: what it does, its default, and the models whose recipe sets it otherwise."""
    from erase.pipelines import models

    meta, default = FIELDS[name].metadata, getattr(_DEFAULTS, name)
    shown = meta.get("default_text") or (",".join(default) if isinstance(default, tuple) else f"{default:g}"
                                         if isinstance(default, float) else str(default))
    others = [f"{m}: {_shown(v)}" for m, entry in models().items()
              if (v := entry.recipe_defaults(None).get(name, default)) != default]
    return f"{meta['help']} (default: {'; '.join([shown, *others])})"


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
