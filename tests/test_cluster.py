"""cluster/: the image, the KubeRay manifests and the kustomize overlays, checked offline.

Every ray.io document of every rendered overlay validates against the CRD schemas of the KubeRay
release in ../shared/kuberay-crds (read the way the API server reads them: defaults applied first,
`nullable` and int-or-string honoured, unknown fields refused unless the schema preserves them);
core kinds validate with kubernetes-validate --strict for the pinned Kubernetes version; the
RayService's serveConfigV2 validates against Ray's ServeDeploySchema and is the one `raystream serve
--config` deploys from the same file; rayVersion, the Ray pin, the Dockerfile's base image and the
image tags agree; every pod runs non-root without privilege escalation and with requests = limits."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT.parent / "shared" / "kuberay-crds"
K8S_VERSION = "1.32.0"  # the EKS version terraform/ asks for
IMAGE = "ghcr.io/raystream/raystream"
POD_ENV = {"PG_DSN": "postgresql://app@db:5432/raystream", "JWKS_URL": "https://idp.example/jwks", "JWT_ISSUER": "https://idp",
           "KAFKA_BOOTSTRAP": "b-1:9098", "REDIS_URL": "rediss://r:6379/0", "CHECKPOINT_BUCKET": "bucket"}


def _pins() -> tuple[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray = next(re.search(r"==([\d.]+)", d).group(1) for d in project["dependencies"] if d.startswith("ray["))
    return ray, project["version"]


RAY, VERSION = _pins()


def _render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH: the overlays cannot be rendered here (it is on the project's machine image)")
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "cluster" / "overlays" / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=["dev", "prod"])
def rendered(request) -> list[dict]:
    return _render(request.param)


# -- the CRD schemas as the API server reads them ------------------------------------------------------

def _structural(node):
    """An openAPIV3Schema node as JSON Schema: nullable unions, int-or-string, closed objects."""
    if isinstance(node, list):
        return [_structural(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _structural(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k not in ("nullable", "format")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
        out["additionalProperties"] = False
    return out


def _defaults(doc, schema):
    """Apply the schema's defaults to ``doc`` (in place), as the API server does before validating."""
    if isinstance(doc, dict) and isinstance(schema, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name not in doc and "default" in sub:
                doc[name] = copy.deepcopy(sub["default"])
            if name in doc:
                _defaults(doc[name], sub)
        if isinstance(schema.get("additionalProperties"), dict):
            for v in doc.values():
                _defaults(v, schema["additionalProperties"])
    elif isinstance(doc, list) and isinstance(schema, dict) and isinstance(schema.get("items"), dict):
        for v in doc:
            _defaults(v, schema["items"])


def _crd_schemas() -> dict[tuple[str, str], dict]:
    out = {}
    for f in CRDS.glob("ray.io_*.yaml"):
        crd = yaml.safe_load(f.read_text())
        for v in crd["spec"]["versions"]:
            out[(f"ray.io/{v['name']}", crd["spec"]["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    return out


SCHEMAS = _crd_schemas() if CRDS.exists() else {}


def _crd_errors(doc: dict) -> list[str]:
    raw = SCHEMAS[(doc["apiVersion"], doc["kind"])]
    doc = copy.deepcopy(doc)
    _defaults(doc, raw)
    validator = jsonschema.Draft7Validator(_structural(raw))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(doc)]


def test_every_ray_document_validates_against_the_kuberay_crds(rendered):
    assert SCHEMAS, f"no CRD schemas under {CRDS}"
    ray_docs = [d for d in rendered if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in ray_docs} == {"RayCluster", "RayService", "RayJob"}
    for d in ray_docs:
        assert _crd_errors(d) == [], (d["kind"], d["metadata"]["name"])


def test_the_crd_check_refuses_unknown_fields_and_wrong_types(rendered):
    svc = next(d for d in rendered if d["kind"] == "RayService")
    bad = copy.deepcopy(svc)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartPrams"] = {}
    assert any("rayStartPrams" in e for e in _crd_errors(bad))
    bad = copy.deepcopy(svc)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "many"
    assert _crd_errors(bad)
    bad = copy.deepcopy(svc)
    bad["spec"]["rayClusterConfig"]["authOptions"] = {"mode": "on"}
    assert _crd_errors(bad)
    ok = copy.deepcopy(svc)  # int-or-string: a port given by name or number both pass
    ok["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["readinessProbe"] = {
        "httpGet": {"port": "serve", "path": "/healthz"}}
    assert _crd_errors(ok) == []


def test_core_kinds_validate_strictly_for_the_pinned_kubernetes(rendered):
    import kubernetes_validate

    core = [d for d in rendered if not d["apiVersion"].startswith(("ray.io/", "monitoring.coreos.com/"))]
    assert {d["kind"] for d in core} >= {"Namespace", "ServiceAccount", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"}
    for d in core:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    bad = copy.deepcopy(next(d for d in core if d["kind"] == "NetworkPolicy"))
    bad["spec"]["podSelectr"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    # the pod templates inside the Ray documents, as core PodTemplates
    for d in rendered:
        for path, template in _templates(d):
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": template}, K8S_VERSION, strict=True)


def _templates(doc: dict):
    spec = doc.get("spec", {})
    clusters = [spec.get("rayClusterConfig"), spec.get("rayClusterSpec")] if doc["kind"] != "RayCluster" else [spec]
    for c in clusters:
        if not c:
            continue
        yield "head", c["headGroupSpec"]["template"]
        for g in c.get("workerGroupSpecs", []):
            yield g["groupName"], g["template"]
    if doc["kind"] == "RayJob" and spec.get("submitterPodTemplate"):
        yield "submitter", spec["submitterPodTemplate"]


def test_pods_are_non_root_without_escalation_with_requests_equal_to_limits(rendered):
    for d in rendered:
        for name, t in _templates(d):
            pod = t["spec"]
            assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            assert pod.get("serviceAccountName") == "raystream", (d["metadata"]["name"], name)
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
                assert sc["readOnlyRootFilesystem"] is True, (d["metadata"]["name"], name)
                assert c["resources"]["requests"] == c["resources"]["limits"], (d["metadata"]["name"], name)
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                assert "/tmp" in mounts  # Ray's session directory on a writable emptyDir


def test_versions_and_image_tags_agree(rendered):
    images = set()
    for d in rendered:
        spec = d.get("spec", {})
        for c in ([spec] if d["kind"] == "RayCluster" else [spec.get("rayClusterConfig"), spec.get("rayClusterSpec")]):
            if c:
                assert c["rayVersion"] == RAY, (d["kind"], d["metadata"]["name"])
        for _, t in _templates(d):
            images |= {c["image"] for c in t["spec"]["containers"]}
    assert images == {f"{IMAGE}:{VERSION}"}
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    base = re.search(r"ARG RAY_IMAGE=rayproject/ray:([\d.]+)-py(\d)(\d+)", dockerfile)
    assert base and base.group(1) == RAY
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f"{base.group(2)}.{base.group(3)}" in requires
    helm = yaml.safe_load((ROOT / "cluster" / "helm" / "kuberay-operator-values.yaml").read_text())
    source = (CRDS / "SOURCE.md").read_text()
    assert f"tag `{helm['image']['tag']}`" in source  # the operator is the release whose CRDs we validate against


def test_serve_config_v2_is_the_one_raystream_serve_deploys(rendered, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from serve.config import load_config
    from serve.runner import serve_config_v2

    for k, v in POD_ENV.items():
        monkeypatch.setenv(k, v)
    svc = next(d for d in rendered if d["kind"] == "RayService")
    doc = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(doc)
    config_map = next(d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "raystream-serve")
    assert config_map["data"]["serve.yaml"] == (ROOT / "cluster/base/config/serve.yaml").read_text()
    cfg = load_config(ROOT / "cluster/base/config/serve.yaml")
    assert doc == serve_config_v2(cfg, "/etc/raystream/serve.yaml")
    # every Ray container of the RayService mounts that file where serveConfigV2 says, and runs the proxy gate
    for _, t in _templates(svc):
        for c in t["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env["RAYSTREAM_SERVE_CONFIG"] == "/etc/raystream/serve.yaml"
            assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "serve.guard.proxy_gate"
            assert {"mountPath": "/etc/raystream/serve.yaml", "name": "serve-config", "readOnly": True,
                    "subPath": "serve.yaml"} in c["volumeMounts"]


def test_pipeline_specs_in_the_config_maps_load(rendered, monkeypatch):
    from pipeline.spec import parse_spec

    for k, v in POD_ENV.items():
        monkeypatch.setenv(k, v)
    pipes = next(d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "raystream-pipelines")
    names = {parse_spec(yaml.safe_load(text)).name for text in pipes["data"].values()}
    assert names == {"clicks", "clicks-backfill"}
    jobs = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "RayJob"}
    for job in jobs.values():  # each job's entrypoint names a spec the ConfigMap holds
        path = re.search(r"/etc/raystream/pipelines/(\S+)", job["spec"]["entrypoint"]).group(1)
        assert path in pipes["data"]
    assert jobs["raystream-clicks"]["spec"]["clusterSelector"] == {"ray.io/cluster": "raystream-pipelines"}
    assert jobs["raystream-backfill"]["spec"]["shutdownAfterJobFinishes"] is True


def test_app_builder_builds_the_application_from_the_config_file(monkeypatch, tmp_path):
    """What a RayService deploys from serveConfigV2 is the deployment of the config file, env expanded."""
    import json

    from serve.app import app_builder
    from tests.serve_keys import Keys

    (tmp_path / "jwks.json").write_text(json.dumps(Keys().jwks()))
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump({
        "postgres_dsn": "${PG_DSN}", "auth": {"jwks_file": str(tmp_path / "jwks.json"), "issuer": "i", "audience": "a"},
        "autoscaling": {"min_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 3, "max_ongoing_requests": 700}}))
    with pytest.raises(Exception, match="PG_DSN"):  # an unset variable is named, not passed on as text
        app_builder({"config": str(tmp_path / "serve.yaml")})
    monkeypatch.setenv("PG_DSN", "postgresql://x@127.0.0.1:1/x")
    dep = app_builder({"config": str(tmp_path / "serve.yaml")})._bound_deployment
    auto = dep._deployment_config.autoscaling_config
    assert (dep.name, auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests,
            dep._deployment_config.max_ongoing_requests) == ("raystream-api", 2, 5, 3, 700)


def test_namespaces_and_network_policies(rendered):
    ns = {d["metadata"].get("namespace") for d in rendered if d["kind"] != "Namespace"}
    namespaces = [d for d in rendered if d["kind"] == "Namespace"]
    assert len(ns) == 1 and {n["metadata"]["name"] for n in namespaces} == ns
    assert namespaces[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    policies = {d["metadata"]["name"]: d["spec"] for d in rendered if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    api = policies["api-ingress"]["ingress"][0]
    assert sorted(p["port"] for p in api["ports"]) == [8000, 8001, 9000]  # the API ports only, from the ingress namespace
    dashboard_from = [rule for p in policies.values() for rule in p.get("ingress", [])
                      if any(port.get("port") == 8265 for port in rule.get("ports", []))]
    assert all(r["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kuberay-system"}
               for r in dashboard_from)  # the dashboard / Jobs API is reachable from the operator only
