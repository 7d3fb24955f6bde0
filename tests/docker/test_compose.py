"""docker/compose.yaml rendered by a real compose parser, profile by profile, and the nginx.conf it mounts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"
NGINX_CONF = ROOT / "docker" / "nginx.conf"

PROFILES = {
    "gpu": ["mt-gpu"],
    "cpu": ["mt-cpu"],
    "scale": ["mt-replica", "nginx"],
    "scale-cpu": ["mt-replica-cpu", "nginx-cpu"],
}
SERVING = {"mt-gpu": "gpu", "mt-cpu": "cpu", "mt-replica": "gpu", "mt-replica-cpu": "cpu"}


def render(compose: list[str], profile: str, **env: str) -> dict:
    """``compose --profile P config``: the file as the parser understood it (interpolated, merged)."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("MT_", "COMPOSE_"))}
    command = [*compose, "-f", str(COMPOSE), "--profile", profile, "config"]
    result = subprocess.run(command, capture_output=True, text=True, env={**environment, **env}, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_renders(compose: list[str], profile: str) -> None:
    services = render(compose, profile)
    for name in PROFILES[profile]:
        assert profile in services[name]["profiles"]


@pytest.mark.parametrize("name", SERVING)
def test_serving_service(compose: list[str], name: str) -> None:
    kind = SERVING[name]
    profile = next(p for p, names in PROFILES.items() if name in names)
    service = render(compose, profile)[name]
    dockerfile = "docker/Dockerfile" if kind == "gpu" else "docker/Dockerfile.cpu"
    assert service["build"]["dockerfile"] == dockerfile
    assert Path(service["build"]["context"]).resolve() == ROOT
    assert service["environment"]["MT_DEVICE"] == ("cuda" if kind == "gpu" else "cpu")
    assert service["environment"]["MT_MODELS"] == "/app/models/multi30k-de-en"
    assert service["healthcheck"]["test"] == ["CMD", "python", "/app/docker/healthcheck.py"]
    assert service["restart"] == "unless-stopped"
    (volume,) = service["volumes"]
    assert volume["target"] == "/models" and volume["read_only"] is True
    assert Path(volume["source"]).resolve() == ROOT / "models"
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    if kind == "gpu":
        (device,) = devices
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert int(device["count"]) == 1
    else:
        assert devices is None


def test_settings_come_from_the_environment(compose: list[str], tmp_path: Path) -> None:
    env = {"MT_MODELS": "/models/mine", "MT_USER_MODELS": str(tmp_path), "MT_REPLICAS": "3", "MT_MAX_WAIT_MS": "2"}
    replica = render(compose, "scale", **env)["mt-replica"]
    assert replica["deploy"]["replicas"] == 3
    assert replica["environment"]["MT_MODELS"] == "/models/mine"
    assert replica["environment"]["MT_MAX_WAIT_MS"] == "2"
    assert Path(replica["volumes"][0]["source"]) == tmp_path


@pytest.mark.parametrize("profile", ["scale", "scale-cpu"])
def test_scale_profile_puts_nginx_in_front(compose: list[str], profile: str) -> None:
    replica_name, nginx_name = PROFILES[profile]
    services = render(compose, profile)
    replica, nginx = services[replica_name], services[nginx_name]
    assert replica["deploy"]["replicas"] == 2
    assert "ports" not in replica  # only nginx is published
    assert replica["networks"]["default"]["aliases"] == ["mt-upstream"]
    assert nginx["depends_on"][replica_name]["condition"] == "service_healthy"
    (port,) = nginx["ports"]
    assert int(port["published"]) == 8000 and int(port["target"]) == 8080
    (volume,) = nginx["volumes"]
    assert Path(volume["source"]) == NGINX_CONF and volume["target"] == "/etc/nginx/nginx.conf"


def test_nginx_conf_balances_least_connections() -> None:
    crossplane = pytest.importorskip("crossplane", reason="crossplane parses nginx.conf (in the dev extra)")
    parsed = crossplane.parse(str(NGINX_CONF))
    assert parsed["status"] == "ok", parsed["errors"]
    (http,) = [d for d in parsed["config"][0]["parsed"] if d["directive"] == "http"]
    (upstream,) = [d for d in http["block"] if d["directive"] == "upstream"]
    directives = {d["directive"]: d["args"] for d in upstream["block"]}
    assert "least_conn" in directives
    assert directives["server"][0] == "mt-upstream:8000"  # the replicas' alias and container port
    (server,) = [d for d in http["block"] if d["directive"] == "server"]
    listen = [d["args"] for d in server["block"] if d["directive"] == "listen"]
    assert listen == [["8080"]]
    (location,) = [d for d in server["block"] if d["directive"] == "location"]
    proxy = {d["directive"]: d["args"] for d in location["block"]}
    assert proxy["proxy_pass"] == [f"http://{upstream['args'][0]}"]
    assert "http_503" in proxy["proxy_next_upstream"]
