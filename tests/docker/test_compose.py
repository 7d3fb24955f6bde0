"""docker/compose.yaml rendered by a real compose parser, profile by profile, and the nginx.conf it mounts:
only nginx is published (on 127.0.0.1 unless opted in), keys and limits are on, the settings are real ones."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from service.ratelimit import RateLimiter
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"
NGINX_CONF = ROOT / "docker" / "nginx.conf"

PROFILES = {  # the serving service, then the nginx in front of it
    "gpu": ["mt-gpu", "nginx-gpu"],
    "cpu": ["mt-cpu", "nginx-cpu"],
    "scale": ["mt-replica", "nginx-scale"],
    "scale-cpu": ["mt-replica-cpu", "nginx-scale-cpu"],
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


def published(service: dict) -> list[tuple[str, int, int]]:
    """(host address, published port, container port) of each port, from either compose's short or long form."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, str):
            *host, published_port, target = port.split("/")[0].split(":")
            out.append((host[0] if host else "0.0.0.0", int(published_port), int(target)))
        else:
            out.append((port.get("host_ip", "0.0.0.0"), int(port["published"]), int(port["target"])))
    return out


@pytest.mark.parametrize("name", SERVING)
def test_keys_and_limits_are_on_with_real_settings(compose: list[str], name: str) -> None:
    profile = next(p for p, names in PROFILES.items() if name in names)
    service = render(compose, profile)[name]
    env = service["environment"]
    assert env["MT_API_KEYS_FILE"] == "/run/secrets/mt_api_keys"
    assert [s if isinstance(s, str) else s["source"] for s in service["secrets"]] == ["mt_api_keys"]
    unknown = [key for key in env if key.startswith("MT_") and key[3:].lower() not in Settings.model_fields]
    assert not unknown, f"not settings (typos?): {unknown}"
    settings = Settings(**{key[3:].lower(): value for key, value in env.items()})
    limiter = RateLimiter(settings)  # every limit parses ...
    assert {rule.setting for rule in limiter.rules} == {  # ... and all four are on
        "MT_KEY_REQUEST_LIMIT",
        "MT_KEY_CHAR_LIMIT",
        "MT_ADDRESS_REQUEST_LIMIT",
        "MT_ADDRESS_CHAR_LIMIT",
    }
    assert settings.forwarded_allow_ips == "*" and "ports" not in service  # only nginx can reach it
    assert service["networks"]["default"]["aliases"] == ["mt-upstream"]
    grace = int(str(service["stop_grace_period"]).removesuffix("s"))
    assert grace >= settings.drain_s + settings.request_timeout_s + 5  # the drain, then in-flight requests


@pytest.mark.parametrize("profile", PROFILES)
def test_only_nginx_is_published_on_loopback_unless_opted_in(compose: list[str], profile: str) -> None:
    serving, proxy = PROFILES[profile]
    services = render(compose, profile)
    assert "ports" not in services[serving]
    assert published(services[proxy]) == [("127.0.0.1", 8000, 8080)]
    assert services[proxy]["depends_on"][serving]["condition"] == "service_healthy"
    opted_in = render(compose, profile, MT_PUBLISH_ADDRESS="0.0.0.0", MT_PUBLISH_PORT="80")[proxy]
    assert published(opted_in) == [("0.0.0.0", 80, 8080)]


def test_settings_come_from_the_environment(compose: list[str], tmp_path: Path) -> None:
    env = {"MT_MODELS": "/models/mine", "MT_USER_MODELS": str(tmp_path), "MT_REPLICAS": "3", "MT_MAX_WAIT_MS": "2"}
    replica = render(compose, "scale", **env)["mt-replica"]
    assert replica["deploy"]["replicas"] == 3
    assert replica["environment"]["MT_MODELS"] == "/models/mine"
    assert replica["environment"]["MT_MAX_WAIT_MS"] == "2"
    assert Path(replica["volumes"][0]["source"]) == tmp_path


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_puts_nginx_in_front(compose: list[str], profile: str) -> None:
    serving, proxy = PROFILES[profile]
    services = render(compose, profile)
    if profile.startswith("scale"):
        assert services[serving]["deploy"]["replicas"] == 2
    (volume,) = services[proxy]["volumes"]
    assert Path(volume["source"]) == NGINX_CONF and volume["target"] == "/etc/nginx/nginx.conf"


def _nginx_http() -> list[dict]:
    crossplane = pytest.importorskip("crossplane", reason="crossplane parses nginx.conf (in the dev extra)")
    parsed = crossplane.parse(str(NGINX_CONF))
    assert parsed["status"] == "ok", parsed["errors"]
    (http,) = [d for d in parsed["config"][0]["parsed"] if d["directive"] == "http"]
    return http["block"]


def _size(text: str) -> int:
    return int(text[:-1]) * {"k": 1024, "m": 1024**2}[text[-1]]


def test_nginx_limits_sizes_times_and_each_address() -> None:
    http = _nginx_http()
    top = {d["directive"]: d["args"] for d in http}
    defaults = Settings()
    service_body = defaults.max_items * (defaults.max_chars * 6 + 64) + 64 * 1024  # service/app.py's limit
    assert _size(top["client_max_body_size"][0]) >= service_body  # nginx never refuses what the service takes
    count, size = top["large_client_header_buffers"]
    assert int(count) * _size(size) <= defaults.max_header_bytes  # nor passes a head the service refuses
    for timeout in ("client_header_timeout", "client_body_timeout", "send_timeout", "keepalive_timeout"):
        assert int(top[timeout][0].removesuffix("s")) <= 30
    zones = {d["args"][1]: d["args"] for d in http if d["directive"] in ("limit_req_zone", "limit_conn_zone")}
    assert set(zones) == {"zone=mt_requests:10m", "zone=mt_connections:10m"}
    assert all(args[0] == "$binary_remote_addr" for args in zones.values())  # counted per client address
    assert top["limit_req_status"] == ["429"] and top["limit_conn_status"] == ["429"]
    (server,) = [d for d in http if d["directive"] == "server"]
    in_server = {d["directive"]: d["args"] for d in server["block"]}
    assert in_server["limit_req"][0] == "zone=mt_requests" and in_server["limit_conn"][0] == "mt_connections"
    assert in_server["error_page"] == ["429", "=", "@too_many_requests"]
    locations = {tuple(d["args"]): d["block"] for d in server["block"] if d["directive"] == "location"}
    too_many = {d["directive"]: d["args"] for d in locations[("@too_many_requests",)]}
    assert too_many["add_header"] == ["Retry-After", "1", "always"] and too_many["return"][0] == "429"
    assert {d["directive"]: d["args"] for d in locations[("=", "/metrics")]} == {"return": ["404"]}


def test_nginx_retries_only_requests_that_never_reached_a_replica() -> None:
    (server,) = [d for d in _nginx_http() if d["directive"] == "server"]
    (location,) = [d for d in server["block"] if d["directive"] == "location" and d["args"] == ["/"]]
    proxy = {d["directive"]: d["args"] for d in location["block"] if d["directive"] != "proxy_set_header"}
    assert proxy["proxy_next_upstream"] == ["error"]  # no http_503, no timeout: never decode a request twice
    headers = {d["args"][0]: d["args"][1] for d in location["block"] if d["directive"] == "proxy_set_header"}
    assert headers["X-Forwarded-For"] == "$remote_addr"  # replaced: a client cannot choose its counted address
    assert int(proxy["proxy_read_timeout"][0].removesuffix("s")) > Settings().request_timeout_s


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
    (location,) = [d for d in server["block"] if d["directive"] == "location" and d["args"] == ["/"]]
    proxy = {d["directive"]: d["args"] for d in location["block"]}
    assert proxy["proxy_pass"] == [f"http://{upstream['args'][0]}"]
