"""docker/k8s/: every kustomization rendered by `kubectl kustomize`, every object validated against the
Kubernetes schemas, and the facts the pods rely on checked against the service itself: the probe paths answer
as the probes expect, the grace period outlasts mt-serve's drain, the HPA's metric is a gauge on /metrics, the
Ingress lets the service's own 413 through, and the pods run as the images' non-root user from pinned images.

No cluster runs here: scheduling, the Prometheus adapter and GPU nodes are not exercised (docs/kubernetes.md).
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import uvicorn
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service import cli as serve_cli
from service.app import app_settings, create_app
from service.client import API_KEY_ENV
from service.client import parse_args as translate_args
from service.settings import Settings, unknown_variables

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed: `pip install kubernetes-validate` (dev extra)"
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]
# Each kustomization, and the MT_DEVICE of its mt-serve pods (None: it has no mt-serve Deployment).
KUSTOMIZATIONS = {"base": "auto", "cpu": "cpu", "gpu": "cuda", "model-pvc": "cpu", "job": None, "monitoring": None}
SERVING = [name for name, device in KUSTOMIZATIONS.items() if device]
WORKLOADS = [*SERVING, "job"]
IMAGE_FLAVOUR = {"auto": "cpu", "cpu": "cpu", "cuda": "gpu"}
# The oldest and the newest Kubernetes the schemas are checked against.
K8S_VERSIONS = ("1.25", kubernetes_validate.utils.latest_version())
# Custom resources: no schema in kubernetes-validate; their facts are checked below instead.
CRD_GROUPS = ("monitoring.coreos.com/",)
ADAPTER_VALUES = K8S / "monitoring" / "prometheus-adapter-values.yaml"
API_KEY = "k8s-test-key"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


@functools.cache
def render(kubectl: str, name: str) -> list[dict]:
    result = subprocess.run([kubectl, "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(objects: list[dict], kind: str) -> dict:
    (found,) = [obj for obj in objects if obj["kind"] == kind]
    return found


def server_container(objects: list[dict]) -> dict:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def pod_env(objects: list[dict]) -> dict[str, str]:
    """The MT_* variables of the mt-serve container: its ConfigMaps (by their generated names), then its env."""
    container = server_container(objects)
    maps = {obj["metadata"]["name"]: obj["data"] for obj in objects if obj["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    env.update({item["name"]: item["value"] for item in container.get("env", [])})
    return env


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The service's settings as a pod with this environment reads them."""
    for key in [key for key in os.environ if key.startswith("MT_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def nginx_bytes(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", size).groups()
    return int(number) * 1024 ** ("kmg".index(unit.lower()) + 1) if unit else int(number)


def covered(path: str, ingress: dict) -> bool:
    """Whether the Ingress routes ``path`` (Kubernetes path matching: Exact, or Prefix by path elements)."""
    for rule in ingress["spec"]["rules"]:
        for item in rule["http"]["paths"]:
            prefix = item["path"].rstrip("/")
            if item["pathType"] == "Exact" and path == item["path"]:
                return True
            if item["pathType"] == "Prefix" and (path == prefix or path.startswith(prefix + "/") or prefix == ""):
                return True
    return False


def local_pod_env(objects: list[dict], tmp_path: Path, **overrides: str) -> dict[str, str]:
    """A pod's MT_* variables for a process here: the mounted Secret's keys file replaced by a local one."""
    keys = tmp_path / "api-keys"
    keys.write_text(API_KEY + "\n", encoding="utf-8")
    return {**pod_env(objects), "MT_API_KEYS_FILE": str(keys), **overrides}


@pytest.fixture
def pod_client(
    kubectl: str, served_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    """The app in process, configured as a CPU pod is (its ConfigMap and env, API keys on), serving the tiny
    model."""
    env = local_pod_env(render(kubectl, "cpu"), tmp_path, MT_MODELS=str(served_model_dir), MT_THREADS="1")
    with TestClient(create_app(settings_from(env, monkeypatch))) as client:
        yield client


@pytest.fixture
def unready_client(kubectl: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The same app before its model has loaded (the model dir does not exist, so it never will)."""
    env = local_pod_env(render(kubectl, "cpu"), tmp_path, MT_MODELS=str(tmp_path / "no-model"))
    with TestClient(create_app(settings_from(env, monkeypatch))) as client:
        yield client


def test_every_kustomization_is_listed() -> None:
    assert set(KUSTOMIZATIONS) == {path.parent.name for path in K8S.glob("*/kustomization.yaml")}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renders_and_validates_against_the_kubernetes_schemas(kubectl: str, name: str) -> None:
    objects = render(kubectl, name)
    assert objects
    for obj in objects:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)  # raises on any unknown or mistyped field


def test_the_validation_catches_a_misspelled_field(kubectl: str) -> None:
    deployment = copy.deepcopy(one(render(kubectl, "cpu"), "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("name", WORKLOADS)
def test_pods_run_as_the_images_user_from_pinned_images(kubectl: str, name: str) -> None:
    (uid,) = {int(m) for path in DOCKERFILES for m in re.findall(r"^USER (\d+)$", path.read_text(), re.M)}
    version = importlib.metadata.version("mt-service")
    device = KUSTOMIZATIONS[name] or "cpu"
    for workload in [obj for obj in render(kubectl, name) if obj["kind"] in ("Deployment", "Job")]:
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for container in pod["containers"]:
            # A tag naming this release and the image flavour: never `latest`, never untagged.
            assert container["image"] == f"mt-service:{version}-{IMAGE_FLAVOUR[device]}"
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}
            assert "emptyDir" in mounts["/tmp"]  # the one writable path
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind])


@pytest.mark.parametrize("name", SERVING)
def test_manifest_settings_are_the_services_settings(kubectl: str, name: str, monkeypatch) -> None:
    env = pod_env(render(kubectl, name))
    assert not unknown_variables(env), "not settings of the service (service/settings.py), so ignored"
    settings = settings_from(env, monkeypatch)
    assert settings.device == KUSTOMIZATIONS[name] and settings.host == "0.0.0.0"
    container = server_container(render(kubectl, name))
    assert [port["containerPort"] for port in container["ports"]] == [settings.port]
    assert one(render(kubectl, name), "Deployment")["spec"]["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(settings.port),
        "prometheus.io/path": "/metrics",
    }
    # The keys file lies in the mounted Secret.
    volumes = one(render(kubectl, name), "Deployment")["spec"]["template"]["spec"]["volumes"]
    (keys,) = [volume["name"] for volume in volumes if volume.get("secret", {}).get("secretName") == "mt-api-keys"]
    (mount,) = [mount["mountPath"] for mount in container["volumeMounts"] if mount["name"] == keys]
    assert Path(env["MT_API_KEYS_FILE"]).parent == Path(mount)


def test_device_resources(kubectl: str) -> None:
    for name in SERVING:
        container = server_container(render(kubectl, name))
        pod = one(render(kubectl, name), "Deployment")["spec"]["template"]["spec"]
        gpus = {kind: container["resources"][kind].get("nvidia.com/gpu") for kind in ("requests", "limits")}
        if KUSTOMIZATIONS[name] == "cuda":
            assert gpus["limits"] >= 1 and gpus["requests"] == gpus["limits"]
            assert pod["nodeSelector"] and pod["tolerations"]
        else:
            assert gpus == {"requests": None, "limits": None} and "nodeSelector" not in pod
        # onnxruntime's threads over the decode loops fit the CPU limit (0 = auto would count the node's cores).
        env = pod_env(render(kubectl, name))
        threads = int(env.get("MT_THREADS", 0))
        loops = int(env.get("MT_DECODE_LOOPS", 1 if KUSTOMIZATIONS[name] == "cuda" else 0))  # auto: 1 on CUDA
        if name != "base":
            assert threads >= 1 and loops >= 1
            assert threads * loops <= float(container["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("name", SERVING)
def test_the_objects_find_each_other(kubectl: str, name: str) -> None:
    """Selectors pick the pods, backends name real ports, the HPA scales the Deployment."""
    objects = render(kubectl, name)
    deployment, service = one(objects, "Deployment"), one(objects, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels
    assert service["spec"]["selector"].items() <= pod_labels
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels
    for spread in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert spread["labelSelector"]["matchLabels"].items() <= pod_labels
    container_ports = {port["name"] for port in server_container(objects)["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= container_ports
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    for rule in one(objects, "Ingress")["spec"]["rules"]:
        for item in rule["http"]["paths"]:
            backend = item["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"] and backend["port"]["name"] in service_ports
    hpa = one(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # A node drain (PDB: one pod at a time) never takes the last pod.
    assert hpa["spec"]["minReplicas"] > one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"]
    monitor = one(render(kubectl, "monitoring"), "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]} <= service_ports


@pytest.mark.parametrize("name", SERVING)
def test_grace_period_outlasts_the_drain(
    kubectl: str, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mt-serve started with the pod's settings: its drain (MT_DRAIN_S with the port open, then the graceful
    shutdown uvicorn is given for in-flight requests) is shorter than the time the kubelet waits before it
    kills the container."""
    objects = render(kubectl, name)
    settings = settings_from(local_pod_env(objects, tmp_path), monkeypatch)
    servers: list[uvicorn.Server] = []

    def record(server: uvicorn.Server, *args: object, **kwargs: object) -> None:
        servers.append(server)
        server.started = True  # as if it had served and stopped

    monkeypatch.setattr(serve_cli, "check_models", lambda settings: None)  # the image's model is not here
    monkeypatch.setattr(serve_cli, "configure_logging", lambda *args, **kwargs: None)
    monkeypatch.setattr(uvicorn.Server, "run", record)  # uvicorn.run and Server(Config(...)).run() both end here
    assert serve_cli.main([]) == 0
    assert len(servers) == 1, "mt-serve no longer runs a uvicorn.Server: update this test"
    assert settings.drain_s > 0  # the endpoints need a moment to drop a terminating pod
    drain = settings.drain_s + servers[0].config.timeout_graceful_shutdown
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert "lifecycle" not in pod["containers"][0]  # no preStop hook adds to it
    assert pod["terminationGracePeriodSeconds"] > drain


def probes(container: dict) -> dict[str, str]:
    """Probe kind -> the path it GETs on the container's own port."""
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    out = {}
    for kind in PROBES:
        get = container[kind]["httpGet"]
        assert ports.get(get["port"], get["port"]) in ports.values()
        out[kind] = get["path"]
    return out


def wait_started(client: TestClient, container: dict) -> None:
    """Until the startup probe's path answers 200, as the kubelet asks it; fails past the probe's budget."""
    probe = container["startupProbe"]
    deadline = time.monotonic() + probe["periodSeconds"] * probe["failureThreshold"]
    while client.get(probe["httpGet"]["path"]).status_code != 200:
        assert time.monotonic() < deadline, "the model did not load within the startup probe's budget"
        time.sleep(0.05)


def test_probes_answer_as_the_pod_expects(kubectl: str, unready_client: TestClient, pod_client: TestClient) -> None:
    """Without a key (the kubelet sends none, API keys are on): liveness answers while the model loads and
    startup/readiness don't; once loaded, all three answer 200, within the startup probe's budget."""
    paths = {kind: {probes(server_container(render(kubectl, name)))[kind] for name in SERVING} for kind in PROBES}
    assert all(len(found) == 1 for found in paths.values()), f"the overlays disagree on probe paths: {paths}"
    startup, ready, live = (paths[kind].pop() for kind in PROBES)
    assert unready_client.get(live).status_code == 200
    assert unready_client.get(startup).status_code == 503 and unready_client.get(ready).status_code == 503
    wait_started(pod_client, server_container(render(kubectl, "cpu")))
    assert (
        pod_client.get(startup).status_code == 200
        and pod_client.get(ready).status_code == 200
        and pod_client.get(live).status_code == 200
    )
    assert pod_client.post("/v1/translate", json={"text": "w01"}).status_code == 401  # the keys are on


def test_the_hpa_scales_on_a_gauge_that_metrics_exports(kubectl: str, pod_client: TestClient) -> None:
    """The HPA's pod metric, as the adapter serves it, is a per-model gauge on /metrics (scraped without a key)."""
    wait_started(pod_client, server_container(render(kubectl, "cpu")))
    headers = {"Authorization": f"Bearer {API_KEY}"}
    translated = pod_client.post("/v1/translate", json={"text": "w01 w02", "beam_size": 1}, headers=headers)
    assert translated.status_code == 200
    scraped = pod_client.get("/metrics")
    assert scraped.status_code == 200
    families = {family.name: family for family in text_string_to_metric_families(scraped.text)}
    rules = {rule["name"]["as"]: rule for rule in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]}
    hpa_metrics = one(render(kubectl, "cpu"), "HorizontalPodAutoscaler")["spec"]["metrics"]
    pod_metrics = [metric["pods"]["metric"]["name"] for metric in hpa_metrics if metric["type"] == "Pods"]
    assert pod_metrics
    for name in pod_metrics:
        rule = rules[name]  # the adapter serves it under the name the HPA asks for ...
        series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)  # ... from this Prometheus series
        assert re.fullmatch(rule["name"]["matches"].strip("^$"), series)
        assert rule["resources"]["overrides"].keys() == {"namespace", "pod"}
        family = families.get(series)
        assert family is not None, f"{series} is not on /metrics: {sorted(families)}"
        # A gauge (a counter's raw value only grows), with one sample per served model, idle again: 0.
        assert family.type == "gauge"
        assert [(sample.labels.keys(), sample.value) for sample in family.samples] == [({"model"}, 0.0)]
    # The fallback: CPU utilisation, relative to the pods' CPU requests.
    assert any(metric["type"] == "Resource" and metric["resource"]["name"] == "cpu" for metric in hpa_metrics)


def test_the_ingress_routes_the_client_routes_but_not_metrics(kubectl: str, unready_client: TestClient) -> None:
    """Every route of the OpenAPI schema, and every same-site asset the HTML pages load, is exposed; /metrics
    (model names, traffic) stays inside the cluster."""
    ingress = one(render(kubectl, "cpu"), "Ingress")
    paths = set(unready_client.get("/openapi.json").json()["paths"])
    for page in ("/", "/docs", "/redoc"):
        html = unready_client.get(page)
        assert html.status_code == 200 and covered(page, ingress)
        assets = re.findall(r"(?:src|href)=[\"'](/[^\"'?#]*)", html.text)
        paths |= {asset for asset in assets if unready_client.get(asset).status_code == 200}
    assert "/metrics" in paths and not covered("/metrics", ingress)
    hidden = sorted(path for path in paths - {"/metrics"} if not covered(path, ingress))
    assert not hidden, f"add these to docker/k8s/base/ingress.yaml: {hidden}"


def test_the_ingress_lets_the_service_answer_for_itself(kubectl: str, unready_client: TestClient) -> None:
    """A body at the Ingress's size limit reaches the app and gets its 413 that says what to change (not nginx's
    bare page), and nginx waits longer for an answer than the service's own request timeout."""
    annotations = one(render(kubectl, "cpu"), "Ingress")["metadata"]["annotations"]
    settings = app_settings(unready_client.app)
    body = b"x" * nginx_bytes(annotations["nginx.ingress.kubernetes.io/proxy-body-size"])
    response = unready_client.post("/v1/translate", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "send fewer or shorter texts" in response.json()["detail"]
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert float(annotations[f"nginx.ingress.kubernetes.io/{timeout}"]) > settings.request_timeout_s


def test_the_job_runs_mt_translate_against_the_service(kubectl: str) -> None:
    objects = render(kubectl, "job")
    (container,) = one(objects, "Job")["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mt-translate"]
    args = translate_args(container["args"])  # the client's own parser: a renamed flag fails here
    service = one(render(kubectl, "base"), "Service")
    url = urlsplit(args.server)
    assert url.scheme == "http" and url.hostname == service["metadata"]["name"]
    assert url.port in {port["port"] for port in service["spec"]["ports"]}
    (data,) = [mount["mountPath"] for mount in container["volumeMounts"] if mount["name"] == "data"]
    assert args.input.parent == args.output.parent == Path(data) and args.resume
    volumes = one(objects, "Job")["spec"]["template"]["spec"]["volumes"]
    (claim,) = [volume["persistentVolumeClaim"]["claimName"] for volume in volumes if volume["name"] == "data"]
    assert claim == one(objects, "PersistentVolumeClaim")["metadata"]["name"]
    # The key comes from a Secret, under the variable the client reads.
    (key,) = [env for env in container["env"] if env["name"] == API_KEY_ENV]
    assert key["valueFrom"]["secretKeyRef"]["name"] == "mt-batch-api-key"
