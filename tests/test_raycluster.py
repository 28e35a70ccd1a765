"""raycluster.yaml: a KubeRay RayCluster whose GPU pods fit the sweep's per-trial resources."""

import pathlib

import yaml

from erase.sweep import StudySpec
from erase.sweep.trial import GPUS_PER_WORKER

CLUSTER = yaml.safe_load(pathlib.Path(__file__).resolve().parents[1].joinpath("raycluster.yaml").read_text())


def test_it_is_a_kuberay_raycluster_with_an_autoscaling_gpu_group():
    assert CLUSTER["apiVersion"].startswith("ray.io/") and CLUSTER["kind"] == "RayCluster"
    assert CLUSTER["spec"]["enableInTreeAutoscaling"] is True
    (group,) = CLUSTER["spec"]["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    pod = group["template"]["spec"]
    assert "H100" in next(iter(pod["nodeSelector"].values()))
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    mounts = pod["containers"][0]["volumeMounts"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in mounts


def test_gpu_limits_match_the_sweeps_per_trial_resources():
    (group,) = CLUSTER["spec"]["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == GPUS_PER_WORKER == int(group["rayStartParams"]["num-gpus"])
    spec = StudySpec(sweep_id="s", concept="c")
    cpus = float(container["resources"]["limits"]["cpu"])
    assert cpus >= spec.cpus_per_worker * spec.workers_per_trial  # a trial's worker fits in one GPU pod
    head = CLUSTER["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # trial drivers run on the head, GPUs are for workers
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
