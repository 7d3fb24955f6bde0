"""API keys: the key file's format, and 401 / 403 / 200 over the app with health routes left open."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import KeyFileError, KeyStore
from service.settings import Settings

PLAIN_KEY = "k-plain-0123456789"
HASHED_KEY = "k-hashed-abcdef"


def write_keys(path: Path) -> Path:
    hashed = hashlib.sha256(HASHED_KEY.encode()).hexdigest()
    path.write_text(f"# operators: one key per line\n{PLAIN_KEY}\n\n  sha256:{hashed}  \n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def keyed_client(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    keys = write_keys(tmp_path_factory.mktemp("keys") / "keys.txt")
    app = create_app(Settings(models=[served_model_dir], threads=1, api_keys_file=keys))
    with TestClient(app) as client:
        wait_ready(client)
        yield client


def wait_ready(client: TestClient) -> None:
    """Poll readiness while the lifespan loads the model (it reports no event a test could wait on)."""
    for _ in range(600):
        if client.get("/health/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(client.get("/health/ready").text)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_key_file_holds_plain_and_hashed_keys(tmp_path: Path) -> None:
    store = KeyStore.load(write_keys(tmp_path / "keys.txt"))
    assert len(store.digests) == 2
    assert store.key_id(PLAIN_KEY) == hashlib.sha256(PLAIN_KEY.encode()).hexdigest()[:12]
    assert store.key_id(HASHED_KEY) == hashlib.sha256(HASHED_KEY.encode()).hexdigest()[:12]
    assert store.key_id("sha256:" + hashlib.sha256(HASHED_KEY.encode()).hexdigest()) is None  # the hash is no key
    assert store.key_id(PLAIN_KEY + "x") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("good-key\nsha256:abc\n", "keys.txt:2: `sha256:` must be followed by 64 hex digits"),
        ("two words\n", "keys.txt:1: a key must not contain spaces"),
        ("# nothing but comments\n\n", "has no keys"),
    ],
)
def test_a_bad_key_file_is_refused_naming_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(KeyFileError, match=message):
        KeyStore.load(path)
    with pytest.raises(KeyFileError, match="cannot be read"):
        KeyStore.load(tmp_path / "missing.txt")


def test_no_key_is_401_a_wrong_key_403_a_good_one_200(keyed_client: TestClient, copy_sources: list[str]) -> None:
    body = {"text": copy_sources[0], "beam_size": 1}
    missing = keyed_client.post("/v1/translate", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in missing.json()["detail"]
    not_bearer = keyed_client.post("/v1/translate", json=body, headers={"Authorization": f"Basic {PLAIN_KEY}"})
    assert not_bearer.status_code == 401
    wrong = keyed_client.post("/v1/translate", json=body, headers=bearer("not-a-key"))
    assert wrong.status_code == 403 and "not valid" in wrong.json()["detail"]
    for key in (PLAIN_KEY, HASHED_KEY):
        good = keyed_client.post("/v1/translate", json=body, headers=bearer(key))
        assert good.status_code == 200, good.text
        assert good.json()["translations"] == [{"text": copy_sources[0]}]


def test_models_need_a_key_health_and_the_page_do_not(keyed_client: TestClient) -> None:
    assert keyed_client.get("/v1/models").status_code == 401
    assert keyed_client.get("/v1/models", headers=bearer("nope")).status_code == 403
    assert keyed_client.get("/v1/models", headers=bearer(PLAIN_KEY)).json()["models"][0]["name"] == "copy-model"
    assert keyed_client.get("/health/live").json() == {"status": "ok"}
    assert keyed_client.get("/health/ready").json() == {"status": "ready"}
    assert keyed_client.get("/").status_code == 200


def test_without_a_key_file_no_key_is_needed(served_model_dir: Path) -> None:
    app = create_app(Settings(models=[served_model_dir], threads=1, warmup=False))
    with TestClient(app) as client:
        wait_ready(client)
        response = client.post("/v1/translate", json={"text": "w01 w02", "beam_size": 1})
        assert response.status_code == 200 and response.json()["translations"] == [{"text": "w01 w02"}]
