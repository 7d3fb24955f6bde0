"""The service over real HTTP (a uvicorn process on a loopback port) with the trained copy-task model."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from helpers import COPY_TASK, toy_pairs
from live_server import Server

from model.decoding import DecodingOptions
from service.engine import Engine

FORWARD = {"source": "src", "target": "tgt"}


def translate(server: Server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/translate", json=body, timeout=60)


def expected_alignment(attention: dict) -> list[list[int]]:
    """Recomputed from the response: each target word's source word with the most summed subword weight."""

    def words(pieces: list[str]) -> list[int]:
        return list(np.cumsum([i > 0 and p.startswith("\u2581") for i, p in enumerate(pieces)]))

    src_words, tgt_words = words(attention["source_tokens"]), words(attention["target_tokens"])
    summed = np.zeros((max(tgt_words) + 1, max(src_words) + 1))
    for t, row in zip(tgt_words, attention["weights"], strict=True):
        for s, weight in zip(src_words, row, strict=True):
            summed[t, s] += weight
    return [[int(np.argmax(row)), t] for t, row in enumerate(summed)]


def test_copies_held_out_sentences_exactly_in_order(server: Server, copy_sources: list[str]) -> None:
    texts = copy_sources[:60]
    response = translate(server, text=texts, **FORWARD)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "copy-model"
    assert [t["text"] for t in body["translations"]] == texts
    assert set(body["translations"][0]) == {"text"}  # nothing that was not asked for
    assert response.headers["x-request-id"]


def test_a_long_string_is_split_into_lines_and_rejoined(server: Server, copy_sources: list[str]) -> None:
    a, b, c = copy_sources[:3]
    text = f"  {a}\n\n{b}\n{c}\n"
    response = translate(server, text=text, return_attention=True, **FORWARD)
    assert response.status_code == 200, response.text
    item = response.json()["translations"][0]
    assert item["text"] == text  # each line copied, blank line and spacing kept
    weights = np.array(item["attention"]["weights"])
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    assert item["attention"]["alignment"] == expected_alignment(item["attention"])
    assert len(item["attention"]["alignment"]) == len(f"{a} {b} {c}".split())


def test_n_best_alternatives_are_ranked(server: Server, copy_sources: list[str]) -> None:
    response = translate(server, text=copy_sources[:5], beam_size=4, n_best=3, return_scores=True, **FORWARD)
    assert response.status_code == 200, response.text
    for source, item in zip(copy_sources[:5], response.json()["translations"], strict=True):
        assert item["text"] == source
        scores = [item["score"], *(alt["score"] for alt in item["alternatives"])]
        assert len(item["alternatives"]) == 2
        assert scores == sorted(scores, reverse=True)
        assert len({item["text"], *(alt["text"] for alt in item["alternatives"])}) == 3


def test_attention_rows_are_target_tokens_and_sum_to_one(server: Server, copy_sources: list[str]) -> None:
    response = translate(server, text=copy_sources[:4], return_attention=True, **FORWARD)
    assert response.status_code == 200, response.text
    for source, item in zip(copy_sources[:4], response.json()["translations"], strict=True):
        attention = item["attention"]
        weights = np.array(attention["weights"])
        assert weights.shape == (len(attention["target_tokens"]), len(attention["source_tokens"]))
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
        assert "".join(attention["source_tokens"]).replace("\u2581", " ").strip() == source
        assert attention["alignment"] == expected_alignment(attention)
        assert len(attention["alignment"]) == len(source.split())


def test_routes_by_language_pair(server: Server, copy_sources: list[str]) -> None:
    back = translate(server, text=copy_sources[0], source="tgt", target="src")
    assert back.status_code == 200 and back.json()["model"] == "copy-model-back"
    by_target = translate(server, text=copy_sources[0], target="tgt")
    assert by_target.status_code == 200 and by_target.json()["model"] == "copy-model"
    unknown = translate(server, text="w01", source="de", target="en")
    assert unknown.status_code == 404
    assert "src→tgt" in unknown.json()["detail"] and "tgt→src" in unknown.json()["detail"]
    both_loaded = translate(server, text="w01")  # two models: the pair must be given
    assert both_loaded.status_code == 422 and "source and target" in both_loaded.json()["detail"]
    models = httpx.get(f"{server.url}/v1/models").json()["models"]
    assert {(m["source"], m["target"]) for m in models} == {("src", "tgt"), ("tgt", "src")}
    assert all(m["bleu"] == pytest.approx(100.0) for m in models)


BAD_INPUTS = [
    ("no text", {"json": {"beam_size": 2}}, 422, "text"),
    ("text not a string", {"json": {"text": 5}}, 422, "text"),
    ("empty list", {"json": {"text": []}}, 422, "at least one text"),
    ("beam 0", {"json": {"text": "w01", "beam_size": 0}}, 422, "beam_size"),
    ("beam 17", {"json": {"text": "w01", "beam_size": 17}}, 422, "beam_size"),
    ("beam as string", {"json": {"text": "w01", "beam_size": "4"}}, 422, "beam_size"),
    ("n_best over beam", {"json": {"text": "w01", "beam_size": 2, "n_best": 3}}, 422, "raise beam_size"),
    ("max_length 0", {"json": {"text": "w01", "max_length": 0}}, 422, "max_length"),
    ("max_length huge", {"json": {"text": "w01", "max_length": 100000}}, 422, "max_length"),
    ("max_length over the model", {"json": {"text": "w01", "max_length": 1024, **FORWARD}}, 422, "at most 1023"),
    ("length_penalty NaN-ish", {"json": {"text": "w01", "length_penalty": "high"}}, 422, "length_penalty"),
    ("unknown field", {"json": {"text": "w01", "beam": 3}}, 422, "beam"),
    ("array body", {"json": ["w01"]}, 422, "object"),
    ("too many texts", {"json": {"text": ["w01"] * 257, **FORWARD}}, 413, "MT_MAX_ITEMS"),
    ("text too long", {"json": {"text": ["w01", "w01 " * 2600], **FORWARD}}, 413, "text[1]"),
    ("unknown pair", {"json": {"text": "w01", "source": "de", "target": "fr"}}, 404, "available pairs"),
    ("form body", {"data": {"text": "w01"}}, 415, "application/json"),
    ("plain text", {"content": b"w01", "headers": {"content-type": "text/plain"}}, 415, "application/json"),
    ("broken JSON", {"content": b'{"text": ', "headers": {"content-type": "application/json"}}, 400, "JSON"),
    ("binary body", {"content": bytes(range(256)), "headers": {"content-type": "application/json"}}, 400, "JSON"),
]


@pytest.mark.parametrize(
    ("request_args", "status", "says"), [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_gets_a_status_and_a_message(server: Server, request_args: dict, status: int, says: str) -> None:
    response = httpx.post(f"{server.url}/v1/translate", timeout=30, **request_args)
    assert response.status_code == status, response.text
    body = response.json()
    assert says in str(body["detail"])
    assert body["request_id"] == response.headers["x-request-id"]


def test_concurrent_requests_share_decoder_steps(server: Server, copy_sources: list[str]) -> None:
    steps_before = server.metric("mt_engine_steps_total")
    rows_before = server.metric("mt_engine_step_rows_sum")

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            calls = [client.post("/v1/translate", json={"text": s, **FORWARD}) for s in copy_sources[:16]]
            return await asyncio.gather(*calls)

    responses = asyncio.run(run())
    assert [r.json()["translations"][0]["text"] for r in responses] == copy_sources[:16]
    steps = server.metric("mt_engine_steps_total") - steps_before
    rows = server.metric("mt_engine_step_rows_sum") - rows_before
    longest = max(len(s.split()) for s in copy_sources[:16])
    assert 1 <= steps < 16 * 2  # sixteen sentences alone would take at least two calls each
    assert rows / steps > 4  # a call held more than one sentence's four beams on average
    assert steps <= 4 * (longest + 2)  # the sentences shared steps, not one after another
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("mt_requests_total", "mt_request_latency_seconds_bucket", "mt_engine_step_rows_bucket"):
        assert name in metrics
    for name in ("mt_queue_depth", "mt_live_rows", "mt_in_flight_requests", "mt_request_steps_bucket"):
        assert name in metrics


def test_translation_does_not_depend_on_the_batch(server: Server, served_model_dir) -> None:
    """Alone (a batch of one, in process) vs batched over HTTP (two concurrent requests of 150 sentences, so
    batches mix requests and lengths): at most 1% differ, and only by float ties."""
    sources = [s for s, _ in toy_pairs(300, "copy", seed=11, n_words=COPY_TASK["n_words"], lengths=(1, 12))]
    engine = Engine.load(served_model_dir, device="cpu", variant="fp32", threads=1)
    options = DecodingOptions(beam_size=4)
    alone = [engine.translate_batch(engine.encode([s]), options)[0].candidates[0] for s in sources]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            halves = (sources[:150], sources[150:])
            body = {"return_scores": True, **FORWARD}
            return await asyncio.gather(*(client.post("/v1/translate", json={"text": h, **body}) for h in halves))

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses), responses[0].text
    batched = [t for r in responses for t in r.json()["translations"]]
    differ = [i for i in range(len(sources)) if batched[i]["text"] != alone[i].text]
    assert len(differ) <= len(sources) // 100, differ
    for i in differ:  # a different choice only where two hypotheses score the same up to float rounding
        assert batched[i]["score"] == pytest.approx(alone[i].score, abs=1e-4)
    assert max(abs(b["score"] - a.score) for b, a in zip(batched, alone, strict=True)) < 1e-3
