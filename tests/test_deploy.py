"""deploy/ and the Dockerfile: what `kubectl apply -k deploy/` creates is valid, and agrees with the image,
the project's requirements and the sweep's per-trial resources.

The RayCluster is validated against KubeRay's RayCluster v1 schema (tests/data/, see its README), made
as strict as the API server: unknown fields are refused, int-or-string quantities accepted. Negative
controls check that this validation does reject known-bad manifests.
"""

import copy
import fnmatch
import json
import pathlib
import re
import shlex
import shutil
import subprocess
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from erase.sweep import StudySpec
from erase.pipelines import model
from erase.sweep.trial import DRIVER_RESOURCE, DRIVER_SLOTS

GPUS_PER_WORKER = model("flux.1-schnell").gpus_per_worker  # what a FLUX.1 sweep's Train worker asks for

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMA = pathlib.Path(__file__).resolve().parent / "data" / "raycluster_v1_schema.json"
MANIFESTS = sorted(p for p in DEPLOY.iterdir() if p.suffix in (".yaml", ".yml") and p.name != "kustomization.yaml")
KUSTOMIZATION = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
DOCS = [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
NAMESPACE = KUSTOMIZATION["namespace"]


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def named(kind: str, name: str) -> dict:
    (doc,) = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    return doc


def namespace_of(doc: dict) -> str:
    return NAMESPACE or doc["metadata"].get("namespace", "default")  # kustomize's `namespace:` wins


CLUSTERS = of_kind("RayCluster")
MLFLOW = named("Deployment", "mlflow")


def groups(cluster: dict) -> list[tuple[str, dict]]:
    """(name, group spec) of the head group and of every worker group."""
    spec = cluster["spec"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first one


def containers(node) -> list[dict]:
    """Every container and init container anywhere in a manifest (where kustomize's `images:` looks)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += value
            else:
                found += containers(value)
    elif isinstance(node, list):
        for item in node:
            found += containers(item)
    return found


def cpus(quantity) -> float:
    """A Kubernetes CPU quantity ("8", 8, "500m") in CPUs."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def args_of(container: dict) -> dict:
    """A container's `--flag=value` / `--flag` arguments as {flag: value or True}."""
    parsed = {}
    for arg in container.get("args", []):
        flag, sep, value = arg.partition("=")
        parsed[flag] = value if sep else True
    return parsed


# --- schema validation ---------------------------------------------------------------------------

def strict(schema):
    """KubeRay's schema as the API server applies it: int-or-string nodes take an integer or a string, nullable
    nodes take null, and an object node with `properties` refuses undeclared fields unless it preserves them."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.get("nullable") and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        if ("properties" in node and not node.get("x-kubernetes-preserve-unknown-fields")
                and "additionalProperties" not in node):
            node["additionalProperties"] = False
        for value in node.values():
            visit(value)

    visit(schema)
    return schema


RAW_SCHEMA = json.loads(SCHEMA.read_text())
STRICT_SCHEMA = strict(RAW_SCHEMA)
jsonschema.Draft7Validator.check_schema(STRICT_SCHEMA)
VALIDATOR = jsonschema.Draft7Validator(STRICT_SCHEMA)


def schema_errors(manifest: dict, validator=VALIDATOR) -> list[str]:
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                  for e in validator.iter_errors(manifest))


def test_deploy_has_a_raycluster():
    assert CLUSTERS, "no kind: RayCluster document under deploy/"


@pytest.mark.parametrize("cluster", CLUSTERS, ids=lambda c: c["metadata"]["name"])
def test_every_raycluster_is_valid_against_kuberays_v1_schema(cluster):
    assert cluster["apiVersion"] == "ray.io/v1"  # the version the schema is for
    assert schema_errors(cluster) == []


def _misspelt_min_replicas(cluster):
    group = cluster["spec"]["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")


def _extra_misspelt_field(cluster):
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8  # keeps the required fields: only strictness rejects it


def _misspelt_deep_in_the_pod_template(cluster):
    head = ray_container(cluster["spec"]["headGroupSpec"])
    head["volumeMount"] = head.pop("volumeMounts")


def _string_for_a_boolean(cluster):
    cluster["spec"]["enableInTreeAutoscaling"] = "yes"


def _integer_ray_start_param(cluster):
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # KubeRay wants strings


BAD = {
    "misspelt minReplicas": (_misspelt_min_replicas, "additionalProperties", "minReplica"),
    "unknown maxReplica beside maxReplicas": (_extra_misspelt_field, "additionalProperties", "maxReplica"),
    "misspelt volumeMounts in a container": (_misspelt_deep_in_the_pod_template, "additionalProperties", "volumeMount"),
    "string enableInTreeAutoscaling": (_string_for_a_boolean, "type", "enableInTreeAutoscaling"),
    "integer rayStartParams value": (_integer_ray_start_param, "type", "num-gpus"),
}


@pytest.mark.parametrize("bad", BAD, ids=str)
def test_the_validation_rejects_a_bad_manifest(bad):
    """A negative control: each breakage is refused, and for the reason planted (not, say, a missing field)."""
    breaks, reason, where = BAD[bad]
    cluster = copy.deepcopy(CLUSTERS[0])
    breaks(cluster)
    errors = list(VALIDATOR.iter_errors(cluster))
    assert errors, f"the schema accepted a manifest with a {bad}"
    assert any(e.validator == reason and (where in e.message or where in map(str, e.absolute_path)) for e in errors), \
        schema_errors(cluster)


def test_unknown_fields_are_refused_only_because_the_schema_is_made_strict():
    """The raw schema accepts a misspelt field (so the strictening step is what catches it)."""
    cluster = copy.deepcopy(CLUSTERS[0])
    _extra_misspelt_field(cluster)
    assert schema_errors(cluster, jsonschema.Draft7Validator(RAW_SCHEMA)) == []
    assert schema_errors(cluster) != []


# --- the image, the project and the cluster agree ---------------------------------------------------

def dockerfile_base() -> re.Match:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    (base,) = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    match = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<major>\d)(?P<minor>\d+)-gpu", base)
    assert match, f"the Dockerfile is not built FROM Ray's GPU image rayproject/ray:<ray>-py<python>-gpu: {base}"
    return match


def project() -> dict:
    if tomllib is None:
        pytest.skip("reading pyproject.toml needs tomllib (Python 3.11+)")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_images_ray_is_every_clusters_and_one_the_project_admits():
    ray = dockerfile_base()["ray"]
    for cluster in CLUSTERS:
        assert cluster["spec"]["rayVersion"] == ray
    (requirement,) = [r for r in map(Requirement, project()["dependencies"]) if canonicalize_name(r.name) == "ray"]
    assert requirement.specifier.contains(ray), f"pyproject.toml's {requirement} does not admit the image's Ray {ray}"


def test_the_images_python_is_one_the_project_admits():
    base = dockerfile_base()
    python = f"{base['major']}.{base['minor']}"
    assert SpecifierSet(project()["requires-python"]).contains(python)


def test_the_dockerfile_installs_the_project_and_the_mlflow_servers_drivers():
    text = (ROOT / "Dockerfile").read_text()
    installs = [line for line in text.splitlines() if re.match(r"\s*RUN .*pip install", line)]
    assert any(re.search(r"\s\.(\s|$)", line) for line in installs), "the Dockerfile does not `pip install .`"
    assert any("psycopg2-binary" in line and "boto3" in line for line in installs)
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".git", "erase-sweeps/", "mlflow.db", ".venv/"):
        assert path in ignored


def test_every_project_pod_runs_the_one_image_kustomization_sets():
    (image,) = KUSTOMIZATION["images"]  # (a `newName:` there moves them all to another registry)
    assert str(image["newTag"]) == project()["version"]
    ours = f"{image['name']}:{image['newTag']}"
    seen = set()
    for file, doc in DOCS:
        for container in containers(doc):
            if doc["kind"] == "StatefulSet" and doc["metadata"]["name"] == "postgres":
                assert container["image"].startswith("postgres:")
                continue
            assert container["image"] == ours, f"{file}: {doc['kind']} {doc['metadata']['name']}: {container['name']}"
            seen.add((doc["kind"], container["name"]))
    for cluster in CLUSTERS:
        for _, group in groups(cluster):
            assert ray_container(group)["image"] == ours
    assert ("Deployment", "mlflow") in seen


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (its built-in kustomize)")
def test_kustomize_sets_the_image_of_every_pod_and_the_namespace(tmp_path):
    """`kubectl kustomize` with another registry and tag: RayCluster pods follow it like the Deployment's."""
    build = tmp_path / "deploy"
    shutil.copytree(DEPLOY, build)
    kustomization = copy.deepcopy(KUSTOMIZATION)
    kustomization["images"][0].update(newName="registry.invalid/team/erase", newTag="test")
    (build / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    out = subprocess.run(["kubectl", "kustomize", str(build)], capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0 and "kustomize" in out.stderr and "unknown command" in out.stderr:
        pytest.skip("this kubectl has no kustomize")
    assert out.returncode == 0, out.stderr
    built = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    assert {d["kind"] for d in built} >= {"Namespace", "PersistentVolumeClaim", "RayCluster", "Deployment",
                                          "StatefulSet"}
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE
        if doc["kind"] in ("RayCluster", "Deployment"):
            assert {c["image"] for c in containers(doc)} == {"registry.invalid/team/erase:test"}


def test_gpu_limits_match_the_sweeps_per_trial_resources():
    spec = StudySpec(sweep_id="s", concept="c")
    for cluster in CLUSTERS:
        (_, head), *workers = groups(cluster)
        assert workers, "no GPU worker group"
        for name, group in workers:
            container = ray_container(group)
            gpus = container["resources"]["limits"]["nvidia.com/gpu"]
            assert int(gpus) == GPUS_PER_WORKER == int(group["rayStartParams"]["num-gpus"]), name
            assert int(container["resources"].get("requests", {}).get("nvidia.com/gpu", gpus)) == int(gpus)
            # the Train workers a pod's GPUs take fit its CPUs too
            workers_per_pod = int(gpus) // GPUS_PER_WORKER
            assert cpus(container["resources"]["limits"]["cpu"]) >= spec.cpus_per_worker * workers_per_pod
        assert head["rayStartParams"]["num-gpus"] == "0"  # trial drivers run on the head, GPUs are for workers
        assert "nvidia.com/gpu" not in ray_container(head)["resources"].get("limits", {})


def test_the_gpu_group_autoscales_from_zero_on_gpu_nodes():
    for cluster in CLUSTERS:
        assert cluster["spec"]["enableInTreeAutoscaling"] is True
        for name, group in groups(cluster)[1:]:
            assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, name
            assert group.get("replicas", 0) <= group["maxReplicas"]
            pod = group["template"]["spec"]
            assert any(label.startswith("nvidia.com/gpu") or "accelerator" in label or "instance-type" in label
                       for label in pod["nodeSelector"]), pod["nodeSelector"]
            assert any(v.lower() == "hopper" or "h100" in v.lower() for v in pod["nodeSelector"].values())
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_the_heads_logical_cpus_fit_its_cpu_limit():
    for cluster in CLUSTERS:
        head = cluster["spec"]["headGroupSpec"]
        limit = cpus(ray_container(head)["resources"]["limits"]["cpu"])
        assert float(head["rayStartParams"].get("num-cpus", limit)) <= limit


def advertised(group: dict) -> dict:
    """The custom resources a group's `rayStartParams.resources` gives `ray start`: KubeRay writes
    `--resources=<value>` into a shell command, so the value is read the way a shell reads it."""
    value = group.get("rayStartParams", {}).get("resources")
    if value is None:
        return {}
    (arg,) = shlex.split(f"--resources={value}")
    return json.loads(arg.removeprefix("--resources="))


def test_only_the_head_advertises_the_resource_trial_drivers_are_pinned_with():
    for cluster in CLUSTERS:
        (_, head), *workers = groups(cluster)
        assert advertised(head).get(DRIVER_RESOURCE) == DRIVER_SLOTS
        for name, group in workers:
            assert DRIVER_RESOURCE not in advertised(group), f"{name}: trial drivers could land on GPU pods"


def test_advertised_resources_are_read_as_the_shell_does():
    assert advertised({"rayStartParams": {"resources": '"{\\"erase_driver\\": 1000}"'}}) == {"erase_driver": 1000}
    with pytest.raises(json.JSONDecodeError):  # unescaped inner quotes: the shell eats them
        advertised({"rayStartParams": {"resources": '"{"erase_driver": 1000}"'}})


def test_every_ray_pod_has_a_memory_backed_dev_shm():
    for cluster in CLUSTERS:
        for name, group in groups(cluster):
            pod = group["template"]["spec"]
            memory = {v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
            mounts = ray_container(group).get("volumeMounts", [])
            assert any(m["mountPath"] == "/dev/shm" and m["name"] in memory for m in mounts), name


def test_ray_pods_track_to_the_mlflow_service():
    service = named("Service", "mlflow")
    (port,) = service["spec"]["ports"]
    mlflow = MLFLOW["spec"]["template"]
    assert all(mlflow["metadata"]["labels"].get(k) == v for k, v in service["spec"]["selector"].items())
    server = next(c for c in mlflow["spec"]["containers"] if c["name"] == "mlflow")
    listens = int(args_of(server)["--port"])
    assert port["targetPort"] in (listens, *(p["name"] for p in server["ports"] if p["containerPort"] == listens))
    expected = f"{service['metadata']['name']}.{namespace_of(service)}.svc.cluster.local"
    allowed = args_of(server)["--allowed-hosts"].split(",")
    for cluster in CLUSTERS:
        for name, group in groups(cluster):
            env = {e["name"]: e.get("value") for e in ray_container(group).get("env", [])}
            uri = urlparse(env["MLFLOW_TRACKING_URI"])
            assert (uri.scheme, uri.hostname, uri.port) == ("http", expected, port["port"]), name
            # mlflow refuses a Host header it does not allow (its --allowed-hosts, matched like this)
            assert any(fnmatch.fnmatch(uri.netloc, a) if "*" in a else uri.netloc == a for a in allowed), uri.netloc


def test_the_mlflow_server_uses_postgres_and_the_shared_volume():
    spec = MLFLOW["spec"]["template"]["spec"]
    server = next(c for c in spec["containers"] if c["name"] == "mlflow")
    assert server.get("command", [])[:2] == ["mlflow", "server"]
    args = args_of(server)
    assert args["--host"] == "0.0.0.0" and args.get("--serve-artifacts") is True
    backend = urlparse(args["--backend-store-uri"])
    assert backend.scheme == "postgresql+psycopg2"  # the driver the image installs
    database = named("Service", "postgres")
    host, namespace = database["metadata"]["name"], namespace_of(database)
    assert backend.hostname in (host, f"{host}.{namespace}", f"{host}.{namespace}.svc.cluster.local")
    assert backend.port == database["spec"]["ports"][0]["port"]
    defined = {e["name"] for e in server.get("env", [])}
    assert set(re.findall(r"\$\((\w+)\)", args["--backend-store-uri"])) <= defined  # what Kubernetes expands
    for env in server["env"]:
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in named("Secret", ref["name"])["stringData"]
    shared = {v["name"] for v in spec["volumes"]
              if v.get("persistentVolumeClaim", {}).get("claimName") == "erase-shared"}
    mounts = [m["mountPath"] for m in server["volumeMounts"] if m["name"] in shared]
    assert any(args["--artifacts-destination"].startswith(m.rstrip("/") + "/") for m in mounts)


def test_postgres_is_a_statefulset_with_its_own_volume():
    database = named("StatefulSet", "postgres")
    assert database["spec"]["volumeClaimTemplates"]
    assert database["spec"]["serviceName"] == named("Service", "postgres")["metadata"]["name"]
    (container,) = database["spec"]["template"]["spec"]["containers"]
    secrets = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
    for name in secrets:
        assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= set(named("Secret", name)["stringData"])


def test_the_shared_volume_is_read_write_many_and_every_claim_exists():
    claims = {doc["metadata"]["name"]: doc for doc in of_kind("PersistentVolumeClaim")}
    assert "ReadWriteMany" in claims["erase-shared"]["spec"]["accessModes"]

    def claim_names(node):
        if isinstance(node, dict):
            if "persistentVolumeClaim" in node:
                yield node["persistentVolumeClaim"]["claimName"]
            for value in node.values():
                yield from claim_names(value)
        elif isinstance(node, list):
            for item in node:
                yield from claim_names(item)

    used = {name for _, doc in DOCS for name in claim_names(doc)}
    assert "erase-shared" in used and used <= set(claims)


def test_kustomization_lists_every_manifest_and_one_namespace():
    assert sorted(KUSTOMIZATION["resources"]) == sorted(p.name for p in MANIFESTS), "a manifest is left out"
    (namespace,) = of_kind("Namespace")
    assert namespace["metadata"]["name"] == NAMESPACE == "erase"
    for file, doc in DOCS:
        assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE, file
