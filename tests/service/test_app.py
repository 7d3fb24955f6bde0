"""The app in process (TestClient): settings, readiness, one-model defaults, docs and the placeholder page."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from model.model_dir import ModelDirError, read_model_dir
from service import translate as translate_module
from service.app import app_settings, create_app
from service.engine import EngineBatch
from service.settings import Settings, get_settings


def wait_ready(client: TestClient) -> dict:
    for _ in range(300):
        response = client.get("/health/ready")
        if response.status_code == 200:
            return response.json()
        time.sleep(0.05)
    raise AssertionError(response.text)


@pytest.fixture
def client(served_model_dir: Path) -> TestClient:
    app = create_app(Settings(models=[served_model_dir], threads=1, max_items=8, max_chars=100))
    with TestClient(app) as test_client:
        wait_ready(test_client)
        yield test_client


def test_one_model_needs_no_language_pair(client: TestClient, copy_sources: list[str]) -> None:
    response = client.post("/v1/translate", json={"text": copy_sources[0], "beam_size": 1})
    assert response.status_code == 200
    assert response.json() == {"model": "copy-model", "translations": [{"text": copy_sources[0]}]}
    assert client.get("/health/live").json() == {"status": "ok"}


def test_limits_come_from_settings(client: TestClient) -> None:
    too_many = client.post("/v1/translate", json={"text": ["w01"] * 9})
    assert too_many.status_code == 413 and "at most 8" in too_many.json()["detail"]
    too_long = client.post("/v1/translate", json={"text": "w01 " * 30})
    assert too_long.status_code == 413 and "MT_MAX_CHARS" in too_long.json()["detail"]


def test_blank_texts_translate_to_themselves(client: TestClient) -> None:
    response = client.post("/v1/translate", json={"text": ["", "  \n", "w01 w02"], "return_attention": True})
    assert response.status_code == 200
    items = response.json()["translations"]
    assert [t["text"] for t in items] == ["", "  \n", "w01 w02"]
    assert items[0]["attention"] == {"source_tokens": [], "target_tokens": [], "weights": [], "alignment": []}


def test_not_ready_answers_503_with_the_reason(tmp_path: Path) -> None:
    app = create_app(Settings(models=[tmp_path / "missing-model"]))
    with TestClient(app) as test_client:
        for _ in range(100):
            ready = test_client.get("/health/ready")
            if "failed to load" in ready.text:
                break
            time.sleep(0.05)
        assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
        # The reason names server paths: the log gets it, clients only learn where to look.
        assert ready.json()["detail"] == "models failed to load (the server log says why)"
        assert str(tmp_path) not in ready.text
        refused = test_client.post("/v1/translate", json={"text": "w01"})
        assert refused.status_code == 503 and "retry-after" in refused.headers


def test_openapi_has_examples_and_the_page_is_served(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) >= {"/v1/translate", "/v1/models", "/health/live", "/health/ready", "/metrics"}
    assert schema["components"]["schemas"]["TranslateRequest"]["examples"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "/docs" in page.text


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MT_MODELS", "models/a,models/b")
    monkeypatch.setenv("MT_MAX_ITEMS", "3")
    monkeypatch.setenv("MT_SPLIT_SENTENCES", "false")
    settings = Settings()
    assert settings.models == [Path("models/a"), Path("models/b")]
    assert settings.max_items == 3 and settings.split_sentences is False
    assert (Settings().max_chars, Settings().max_beam) == (10_000, 16)
    get_settings.cache_clear()
    assert get_settings() is get_settings()
    get_settings.cache_clear()


def test_given_settings_are_not_a_dependency_override() -> None:
    """Any entry in dependency_overrides makes FastAPI re-analyse every dependency's signature per request."""
    settings = Settings(max_items=7)
    app = create_app(settings)
    assert app.dependency_overrides == {}
    assert app_settings(app) is settings


def test_request_timeout_answers_503(served_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step = EngineBatch.step

    def stalling(self: EngineBatch) -> list:
        if any(len(source) > 10 for _, source, _ in self.batch.pending):  # a long sentence joins: stall once
            time.sleep(1.0)
        return step(self)

    monkeypatch.setattr(EngineBatch, "step", stalling)
    app = create_app(Settings(models=[served_model_dir], threads=1, request_timeout_s=0.3))
    with TestClient(app) as test_client:
        wait_ready(test_client)
        late = test_client.post("/v1/translate", json={"text": "w01 w02 w03 w04 w05 w06"})
        assert late.status_code == 503 and late.headers["retry-after"] == "1"
        assert "MT_REQUEST_TIMEOUT_S" in late.json()["detail"]
        time.sleep(1.0)  # the stalled batch finishes; the service goes on
        assert (
            test_client.post("/v1/translate", json={"text": "w01 w02"}).json()["translations"][0]["text"] == "w01 w02"
        )


def test_a_chunked_body_over_the_limit_answers_413(client: TestClient) -> None:
    """No Content-Length to check up front: the bytes are counted as they arrive."""
    limit = 8 * (100 * 6 + 64) + 64 * 1024  # create_app's body limit for max_items=8, max_chars=100

    def body():  # valid JSON (one short text and a lot of whitespace), so only the size is wrong
        yield b'{"text": "w01"'
        for _ in range(limit // 1024 + 2):
            yield b" " * 1024
        yield b"}"

    response = client.post(
        "/v1/translate", content=body(), headers={"content-type": "application/json", "x-request-id": "chunky"}
    )
    assert response.status_code == 413, response.text
    assert "content-length" not in response.request.headers
    detail = response.json()["detail"]
    assert str(limit) in detail and "fewer or shorter texts" in detail
    assert response.headers["x-request-id"] == "chunky" == response.json()["request_id"]
    chunks = iter([b'{"text": ', b'"w01 w02"}'])  # chunked too, under the limit
    small = client.post("/v1/translate", content=chunks, headers={"content-type": "application/json"})
    assert small.status_code == 200 and small.json()["translations"][0]["text"] == "w01 w02"


def test_an_unexpected_error_answers_500_with_the_request_id(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(translate_module, "translate", broken)
    response = client.post("/v1/translate", json={"text": "w01"}, headers={"x-request-id": "bug-42"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "bug-42"
    assert response.json() == {"detail": "internal error; report request id bug-42", "request_id": "bug-42"}


def test_a_request_with_more_sentences_than_the_queue_holds_answers_413(served_model_dir: Path) -> None:
    app = create_app(Settings(models=[served_model_dir], threads=1, queue_size=4))
    with TestClient(app) as test_client:
        wait_ready(test_client)
        lines = test_client.post("/v1/translate", json={"text": "w01\nw02\nw03\nw04\nw05"})  # five sentences
        assert lines.status_code == 413, lines.text
        assert "MT_QUEUE_SIZE=4" in lines.json()["detail"] and "split the request" in lines.json()["detail"]
        texts = test_client.post("/v1/translate", json={"text": ["w01", "w02", "w03", "w04", "w05"]})
        assert texts.status_code == 413, texts.text
        four = "w01 w02\nw03 w04\nw05 w06\nw07 w08"
        fits = test_client.post("/v1/translate", json={"text": four})  # an empty queue takes it
        assert fits.status_code == 200 and fits.json()["translations"][0]["text"] == four


def test_attention_over_the_budget_answers_413(served_model_dir: Path) -> None:
    app = create_app(Settings(models=[served_model_dir], threads=1, max_attention_cells=30))
    with TestClient(app) as test_client:
        wait_ready(test_client)
        small = test_client.post("/v1/translate", json={"text": "w01 w02", "return_attention": True})
        assert small.status_code == 200 and small.json()["translations"][0]["attention"]["weights"]
        # Two lines of four words: 16 target x 16 source subword tokens = 256 weights (dense, block-diagonal).
        big = test_client.post(
            "/v1/translate", json={"text": "w01 w02 w03 w04\nw05 w06 w07 w08", "return_attention": True}
        )
        assert big.status_code == 413, big.text
        detail = big.json()["detail"]
        assert "MT_MAX_ATTENTION_CELLS" in detail and "30" in detail and "return_attention" in detail
        plain = test_client.post("/v1/translate", json={"text": "w01 w02 w03 w04\nw05 w06 w07 w08"})
        assert plain.status_code == 200
        # A short line, then 59 long ones: when the short one finishes, its target tokens x the text's source
        # tokens already prove the response over the budget, so the request is refused then and the long
        # sentences leave the decoder batch before they finish.
        text = "\n".join(["w01 w02"] + ["w03 w04 w05 w06 w07 w08 w09"] * 59)
        before = sentences_decoded(test_client)
        many = test_client.post("/v1/translate", json={"text": text, "return_attention": True})
        assert many.status_code == 413 and "at least" in many.json()["detail"]
        assert sentences_decoded(test_client) - before < 59


def sentences_decoded(test_client: TestClient) -> float:
    lines = test_client.get("/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("mt_sentences_total{"))


@pytest.mark.parametrize("split", [True, False])
def test_a_sentence_longer_than_the_model_reads_answers_413(served_model_dir: Path, split: bool) -> None:
    app = create_app(Settings(models=[served_model_dir], threads=1, split_sentences=split))
    with TestClient(app) as test_client:
        wait_ready(test_client)
        limit = test_client.app.state.service.registry.resolve(None, None).info.config.max_positions - 1
        long = " ".join(["w01"] * (limit + 20))
        # beam 1 and a short max_length keep a (wrong) truncated decode quick
        response = test_client.post("/v1/translate", json={"text": ["w02", long], "beam_size": 1, "max_length": 5})
        assert response.status_code == 413, response.text[:300]
        detail = response.json()["detail"]
        assert detail.startswith("text[1]") and f"over the {limit}" in detail
        assert ("split the sentence" in detail) if split else ("MT_SPLIT_SENTENCES" in detail)


def test_requests_without_decoding_fields_get_the_models_defaults(served_model_dir: Path, tmp_path: Path) -> None:
    """model.json's decoding section (tuned on val) is what a request that sets nothing gets; fields a
    request sets win, and asking for n_best alternatives raises a smaller default beam to fit them."""
    model_dir = tmp_path / "tuned"
    shutil.copytree(served_model_dir, model_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    meta["decoding"] = {"beam_size": 1, "length_penalty": 0.0, "max_length_offset": 50, "tuned_on": "val"}
    (model_dir / "model.json").write_text(json.dumps(meta))
    app = create_app(Settings(models=[model_dir], threads=1))
    text = "w01 w02 w03 w04 w05"

    def score(**fields: object) -> float:
        response = client.post("/v1/translate", json={"text": text, "return_scores": True, **fields})
        assert response.status_code == 200, response.text
        return response.json()["translations"][0]["score"]

    with TestClient(app) as client:
        wait_ready(client)
        default = score()
        assert default == score(beam_size=1, length_penalty=0.0)  # α 0: the score is the plain log-probability
        assert default != score(length_penalty=2.0)  # the request's α wins over the model's
        many = client.post("/v1/translate", json={"text": text, "n_best": 3}).json()["translations"][0]
        assert len(many["alternatives"]) == 2  # the default beam 1 was raised to 3


def test_a_bad_decoding_section_is_named_at_start(served_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "bad"
    shutil.copytree(served_model_dir, model_dir)
    meta = json.loads((model_dir / "model.json").read_text())
    meta["decoding"] = {"beam_size": 0}
    (model_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match=r"bad 'decoding' section: .*beam_size"):
        read_model_dir(model_dir)


def test_patience_is_a_request_field_with_the_models_default_behind_it(
    client: TestClient, served_model_dir: Path
) -> None:
    """``patience`` (CTranslate2's stopping rule) travels from the request, or from model.json's decoding
    section, into the search's options; out-of-range values are refused naming the field."""
    ok = client.post("/v1/translate", json={"text": "w01 w02 w03", "patience": 1.0})
    assert ok.status_code == 200, ok.text
    assert ok.json()["translations"][0]["text"] == "w01 w02 w03"  # the copy model copies, whatever the rule
    for bad in (0, -1, 17):
        refused = client.post("/v1/translate", json={"text": "w01", "patience": bad})
        assert refused.status_code == 422 and "patience" in refused.text, refused.text
    info = read_model_dir(served_model_dir)
    body = translate_module.TranslateRequest(text="w01")
    assert translate_module.decoding_options(body, info).patience is None  # the exact rule by default
    patient = replace(info, decoding=replace(info.decoding, patience=2.0))
    assert translate_module.decoding_options(body, patient).patience == 2.0
    body = translate_module.TranslateRequest(text="w01", patience=0.5)
    assert translate_module.decoding_options(body, patient).patience == 0.5
