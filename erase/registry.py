"""The MLflow model registry: which mask serves production for each concept and base model.

- One registered model per (base model, concept): `erase-<model>-<concept>` (lower case, runs of
  other characters become '-'), e.g. `erase-toy-circle`, `erase-flux-1-schnell-nudity`.
- A version is a trial's `mask/` artifact folder (mask.safetensors + mask.json), registered from
  `runs:/<run id>/mask`, carrying the run's figures and its lineage (run id, sweep id, model,
  architecture fingerprint, mask sha256) as version tags.
- Aliases mark what serves: `models:/erase-toy-circle@production`.
- Promotion gates (defaults in `GATES`, or a YAML file): the erasure rate must be at most
  `max_erasure_rate` and preservation at least `min_preservation`, on the run's held-out test
  figures (`test_erasure_rate`, `test_preservation`: the test split, which no trial selects on)
  where it has them; below them promotion is refused unless forced. A promotion that fails midway deletes the version it created.
- Every mask fetched from the registry is checked: its sha256 against the one recorded when it
  was logged, and (on loading) its architecture fingerprint against the model.
"""

from __future__ import annotations

import json
import os
import tempfile

import yaml

from erase.detectors import sha256_file
from erase.errors import EraseError
from erase.tracking import MASK_DIR, MASK_FILE, TrackingError, experiment_name, slug

GATES = {"max_erasure_rate": 0.05, "min_preservation": 0.9}
DEFAULT_METRIC = "score"  # (1 - erasure_rate / base_rate) * preservation, see erase/trial.py


class RegistryError(EraseError):
    """A registry request cannot be carried out; the message says why and what to do."""


def model_name(model: str, concept: str) -> str:
    return f"erase-{slug(model)}-{slug(concept)}"


def load_gates(path: str | None = None, **overrides) -> dict:
    gates = dict(GATES)
    if path is not None:
        if not os.path.isfile(path):
            raise RegistryError(f"gates file {path!r} does not exist")
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise RegistryError(f"gates file {path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise RegistryError(f"gates file {path}: expected a mapping like {{max_erasure_rate: 0.05}}")
        unknown = set(raw) - set(GATES)
        if unknown:
            raise RegistryError(f"{path}: unknown gate(s) {', '.join(sorted(unknown))}; known: {', '.join(GATES)}")
        for key, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RegistryError(f"{path}: gate {key!r} must be a number, got {value!r}")
        gates.update({k: float(v) for k, v in raw.items()})
    gates.update({k: float(v) for k, v in overrides.items() if v is not None})
    return gates


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def best_run(model: str, concept: str, sweep: str | None = None, metric: str = DEFAULT_METRIC):
    """The finished run with the highest `metric` among the concept's runs (of one sweep if given)."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(experiment_name(model, concept))
    if experiment is None:
        raise RegistryError(f"no runs for concept {concept!r} on model {model!r}: run `erase sweep --concepts "
                            f"{concept}` or `erase train --concept {concept} --tracking-uri ...` first")
    query = "attributes.status = 'FINISHED' and tags.`erase.mask_sha256` != ''"
    if sweep:
        query += f" and tags.`erase.sweep` = '{sweep}'"
    runs = _client().search_runs([experiment.experiment_id], filter_string=query,
                                 order_by=[f"metrics.`{metric}` DESC"], max_results=50)
    runs = [r for r in runs if metric in r.data.metrics]
    if not runs:
        where = f" in sweep {sweep!r}" if sweep else ""
        raise RegistryError(f"no finished run with metric {metric!r} and a mask for concept {concept!r}{where}; "
                            "nothing to promote")
    return runs[0]


def gated_figures(metrics: dict) -> tuple[str, dict]:
    """(prefix, {erasure_rate, preservation}) the gates judge: a trial's held-out test figures
    (`test_` metrics, never selected on) where it has them, else the figures it reported."""
    prefix = "test_" if "test_erasure_rate" in metrics else ""
    return prefix, {k: metrics.get(prefix + k) for k in ("erasure_rate", "preservation")}


def check_gates(metrics: dict, gates: dict) -> list[str]:
    """The gates this run fails, in words (empty: it passes): on its test figures where it has them."""
    failed = []
    prefix, figures = gated_figures(metrics)
    erasure, preservation = figures["erasure_rate"], figures["preservation"]
    if erasure is None or erasure > gates["max_erasure_rate"]:
        failed.append(f"{prefix}erasure_rate {erasure} > max_erasure_rate {gates['max_erasure_rate']}")
    if preservation is None or preservation < gates["min_preservation"]:
        failed.append(f"{prefix}preservation {preservation} < min_preservation {gates['min_preservation']}")
    return failed


def promote(model: str, concept: str, *, sweep: str | None = None, metric: str = DEFAULT_METRIC,
            alias: str = "production", gates: dict | None = None, force: bool = False) -> dict:
    """Register the best run's mask as a new version and move `alias` to it; returns what was done."""
    import re

    from mlflow.exceptions import MlflowException

    if not re.fullmatch(r"[\w\-]+", alias) or alias == "latest" or re.fullmatch(r"v\d+", alias):
        raise RegistryError(f"alias {alias!r} is not allowed: use letters, digits, '-' and '_' "
                            "('latest' and v<number> are reserved by MLflow)")
    gates = gates or dict(GATES)
    run = best_run(model, concept, sweep, metric)
    metrics = run.data.metrics
    failed = check_gates(metrics, gates)
    if failed and not force:
        raise RegistryError(f"run {run.info.run_id} (best by {metric}) fails the promotion gates: "
                            + "; ".join(failed) + ". Improve the erasure or pass --force")
    client = _client()
    name = model_name(model, concept)
    tags = run.data.tags
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"erase.model": model, "erase.concept": concept},
                                       description=f"Masks erasing {concept!r} from {model}")
    lineage = {"erase.run_id": run.info.run_id, "erase.sweep": tags.get("erase.sweep", ""),
               "erase.model": model, "erase.concept": concept, "erase.fingerprint": tags.get("erase.fingerprint", ""),
               "erase.mask_sha256": tags["erase.mask_sha256"], "erase.trial": tags.get("erase.trial", ""),
               "erase.gates": json.dumps(gates), "erase.forced": str(bool(failed)),
               "erase.gated_on": "test split" if gated_figures(metrics)[0] else "the figures the run reported"}
    figures = {f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()
               if k.removeprefix("test_") in ("erasure_rate", "preservation", "sparsity", "score", "base_rate",
                                              "neutral_fidelity", "robust_erasure_rate")}
    version = client.create_model_version(name, source=f"runs:/{run.info.run_id}/{MASK_DIR}", run_id=run.info.run_id,
                                          tags={**lineage, **figures}, await_creation_for=0,
                                          description=f"best of {tags.get('erase.sweep') or 'all runs'} by {metric}")
    try:
        client.set_registered_model_alias(name, alias, version.version)
    except Exception:
        client.delete_model_version(name, version.version)  # no half-made version left behind
        raise
    return {"name": name, "version": str(version.version), "alias": alias, "run_id": run.info.run_id,
            "metric": metric, "metrics": {k: metrics[k] for k in sorted(metrics)}, "forced_past": failed}


def list_masks() -> list[dict]:
    client = _client()
    out = []
    for rm in client.search_registered_models("name LIKE 'erase-%'"):
        aliases = {str(v): [] for v in rm.aliases.values()}
        for a, v in rm.aliases.items():
            aliases[str(v)].append(a)
        versions = client.search_model_versions(f"name = '{rm.name}'", order_by=["version_number DESC"])
        out.append({"name": rm.name, "concept": rm.tags.get("erase.concept"), "model": rm.tags.get("erase.model"),
                    "versions": [{"version": str(v.version), "aliases": aliases.get(str(v.version), []),
                                  "erasure_rate": v.tags.get("metric.erasure_rate"),
                                  "preservation": v.tags.get("metric.preservation"),
                                  "sparsity": v.tags.get("metric.sparsity"), "run_id": v.run_id} for v in versions]})
    return out


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """NAME, NAME@ALIAS or NAME/VERSION (with or without models:/) -> (name, alias, version)."""
    ref = ref[len("models:/"):] if ref.startswith("models:/") else ref
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, None
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return name, None, version
    return ref, None, None


def resolve_version(ref: str):
    """The ModelVersion a reference names (NAME alone: the newest version)."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_ref(ref)
    client = _client()
    try:
        client.get_registered_model(name)
    except MlflowException:
        known = ", ".join(m["name"] for m in list_masks()) or "none yet"
        raise RegistryError(f"no registered mask {name!r}; registered: {known}") from None
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version:
            return client.get_model_version(name, version)
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {version!r}"
        aliases = ", ".join(client.get_registered_model(name).aliases) or "none"
        raise RegistryError(f"{name} has no {what} (aliases: {aliases})") from None
    versions = client.search_model_versions(f"name = '{name}'", order_by=["version_number DESC"], max_results=1)
    if not versions:
        raise RegistryError(f"{name} has no versions")
    return versions[0]


def show(ref: str) -> dict:
    v = resolve_version(ref)
    aliases = [a for a, ver in _client().get_registered_model(v.name).aliases.items() if str(ver) == str(v.version)]
    return {"name": v.name, "version": str(v.version), "aliases": aliases, "source": v.source, "run_id": v.run_id,
            "status": v.status, "created": v.creation_timestamp, "description": v.description, "tags": dict(v.tags)}


def fetch_mask(uri: str, dst: str | None = None) -> tuple[str, dict]:
    """A local, integrity-checked mask file for `uri`: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID, or a path.

    Registry and run masks are checked against the sha256 recorded at logging time; returns
    (path, provenance).
    """
    import mlflow

    if not uri.startswith(("models:/", "runs:/")):
        if not os.path.isfile(uri):
            raise RegistryError(f"mask {uri!r} is neither a file nor a models:/ or runs:/ URI")
        return uri, {"source": os.path.abspath(uri)}
    if uri.startswith("models:/"):
        version = resolve_version(uri)
        expected = version.tags.get("erase.mask_sha256")
        run_id, source = version.run_id, f"models:/{version.name}/{version.version}"
        provenance = {"source": source, "name": version.name, "version": str(version.version), "run_id": run_id}
    else:
        run_id = uri[len("runs:/"):].split("/")[0]
        try:
            run = _client().get_run(run_id)
        except Exception:
            raise RegistryError(f"no run {run_id!r} in the tracking store") from None
        expected, source = run.data.tags.get("erase.mask_sha256"), f"runs:/{run_id}/{MASK_DIR}"
        provenance = {"source": source, "run_id": run_id}
    if not expected:
        raise RegistryError(f"{uri}: no sha256 was recorded for this mask, so it cannot be checked; refusing it")
    dst = dst or tempfile.mkdtemp(prefix="erase-mask-")
    try:
        folder = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst)
    except Exception as err:
        raise TrackingError(f"could not download {source}: {err}") from None
    path = os.path.join(folder, MASK_FILE)
    if not os.path.isfile(path):
        raise RegistryError(f"{source} holds no {MASK_FILE}")
    actual = sha256_file(path)
    if actual != expected:
        raise RegistryError(f"{uri}: the mask file's sha256 {actual[:16]}... does not match the {expected[:16]}... "
                            "recorded when it was logged; the artifact was changed or damaged. Refusing it")
    provenance["sha256"] = actual
    return path, provenance


def load_masks(uris: list[str], sites: list, model: str) -> tuple[list, dict, list[dict]]:
    """Fetch and check masks (files, models:/ or runs:/ URIs) for the architecture whose mask sites are
    `sites` (`model` names it in errors), and combine them: a unit stays only if every mask keeps it.
    Returns (sites, combined binary masks, what each mask was). No weights are needed: the fingerprint
    is checked against the sites (`erase.pipelines.mask_sites(model)` reads them off the meta device)."""
    from erase.masks import combine_binary, load_binary_masks

    loaded, applied = [], []
    for uri in uris:
        path, provenance = fetch_mask(uri)
        masks, meta = load_binary_masks(path, sites, model)
        loaded.append(masks)
        applied.append({"uri": uri, "concept": meta["concept"], **provenance})
    combined_sites, combined = combine_binary(loaded)
    return combined_sites, combined, applied
