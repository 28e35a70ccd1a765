"""Search spaces as data: YAML files naming each hyperparameter's distribution and range.

A space file has:

    description: one line for humans
    fixed:            # settings every trial uses (any erasure setting)
      steps: 100
    search:           # what Optuna searches; each entry one distribution
      beta:    {distribution: loguniform, low: 1.0e-4, high: 0.1}
      lr_ffn:  {distribution: loguniform, low: 0.05, high: 1.0}
      steps:   {distribution: int, low: 50, high: 200, step: 50}
      target:  {distribution: categorical, choices: [empty, substitute]}
      sites:   {distribution: categorical, choices: ["ffn,norm", "ffn,norm,attn"]}

Distributions: loguniform and uniform (floats, low < high, loguniform needs low > 0), int
(low < high, optional step), categorical (a non-empty list). A name may be in `fixed` or in
`search`, not both. `load_space` checks everything and names the file and the key in every error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import yaml

from erase.errors import EraseError

SPACES_DIR = os.path.dirname(os.path.abspath(__file__))
TOP_LEVEL_KEYS = {"description", "fixed", "search"}
DISTRIBUTION_KEYS = {
    "loguniform": {"low", "high"},
    "uniform": {"low", "high"},
    "int": {"low", "high", "step"},
    "categorical": {"choices"},
}


class SpaceError(EraseError):
    """A space file cannot be used; the message names the file, the key and the fix."""


@dataclass
class Space:
    name: str
    path: str
    description: str
    fixed: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)  # name -> {"distribution": ..., ...}

    def optuna_distributions(self) -> dict:
        """The search part as optuna.distributions, the form OptunaSearch takes as its space."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        out = {}
        for key, spec in self.search.items():
            kind = spec["distribution"]
            if kind == "categorical":
                out[key] = CategoricalDistribution(list(spec["choices"]))
            elif kind == "int":
                out[key] = IntDistribution(int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)))
            else:
                out[key] = FloatDistribution(float(spec["low"]), float(spec["high"]), log=kind == "loguniform")
        return out


def available() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(SPACES_DIR) if f.endswith(".yaml"))


def resolve(name_or_path: str) -> str:
    """A shipped space's name (`default`, `toy_fast`, ...) or a path to a YAML file."""
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = os.path.join(SPACES_DIR, f"{name_or_path}.yaml")
    if os.path.isfile(shipped):
        return shipped
    raise SpaceError(f"no search space {name_or_path!r}: not a file, and not a shipped space "
                     f"(shipped: {', '.join(available())})")


def load_space(name_or_path: str, allowed_keys) -> Space:
    """Read and check a space file; `allowed_keys` are the hyperparameters a trial understands."""
    path = resolve(name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SpaceError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{path}: expected a mapping with keys {', '.join(sorted(TOP_LEVEL_KEYS))}")
    unknown = set(raw) - TOP_LEVEL_KEYS
    if unknown:
        raise SpaceError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
                         f"allowed: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    allowed = set(allowed_keys)
    fixed = raw.get("fixed") or {}
    search = raw.get("search") or {}
    if not isinstance(fixed, dict) or not isinstance(search, dict):
        raise SpaceError(f"{path}: `fixed` and `search` must be mappings of setting -> value / distribution")
    if not search:
        raise SpaceError(f"{path}: `search` is empty: name at least one hyperparameter to search")
    for key in list(fixed) + list(search):
        if key not in allowed:
            raise SpaceError(f"{path}: key {key!r} is not an erasure setting; known settings: {', '.join(sorted(allowed))}")
    for key in set(fixed) & set(search):
        raise SpaceError(f"{path}: key {key!r} is both fixed and searched; keep it in one of the two")
    for key, spec in search.items():
        _check_distribution(path, key, spec)
    name = os.path.splitext(os.path.basename(path))[0]
    return Space(name, path, str(raw.get("description", "")), dict(fixed), dict(search))


def _check_distribution(path: str, key: str, spec) -> None:
    where = f"{path}: key {key!r}"
    if not isinstance(spec, dict) or "distribution" not in spec:
        raise SpaceError(f"{where}: expected {{distribution: ..., ...}} with one of {', '.join(DISTRIBUTION_KEYS)}")
    kind = spec["distribution"]
    if kind not in DISTRIBUTION_KEYS:
        raise SpaceError(f"{where}: unknown distribution {kind!r}; use one of {', '.join(DISTRIBUTION_KEYS)}")
    extra = set(spec) - DISTRIBUTION_KEYS[kind] - {"distribution"}
    if extra:
        raise SpaceError(f"{where}: unknown field(s) {', '.join(sorted(extra))} for {kind}")
    if kind == "categorical":
        if not isinstance(spec.get("choices"), list) or not spec["choices"]:
            raise SpaceError(f"{where}: categorical needs a non-empty list `choices`")
        return
    if "low" not in spec or "high" not in spec:
        raise SpaceError(f"{where}: {kind} needs `low` and `high`")
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (TypeError, ValueError):
        raise SpaceError(f"{where}: `low` and `high` must be numbers, got {spec['low']!r} and {spec['high']!r}") from None
    if low > high:
        raise SpaceError(f"{where}: low {low:g} is greater than high {high:g}; swap them")
    if low == high:
        raise SpaceError(f"{where}: the range [{low:g}, {high:g}] is empty; move it to `fixed` or widen it")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: loguniform needs low > 0, got {low:g}")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise SpaceError(f"{where}: int bounds must be whole numbers, got {low:g} and {high:g}")
