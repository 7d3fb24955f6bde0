"""Many models in one server: loading on first use, LRU eviction past MT_MAX_LOADED_MODELS, and a real
``mt-serve`` routing by language pair between the copy model, its reverse and an imported Marian model."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from live_server import Server, start_server

from model.model_dir import read_model_dir
from service.registry import ModelEntry, ModelUnavailable, Registry


@dataclass
class FakeBatcher:
    closed: list[str]
    name: str

    async def close(self) -> None:
        self.closed.append(self.name)


@dataclass
class FakeServed:
    batcher: FakeBatcher


@dataclass
class Opener:
    """Loads fake models; a load waits for ``gate`` when set, and the names in ``broken`` fail."""

    opened: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    broken: set[str] = field(default_factory=set)
    gate: asyncio.Event | None = None

    async def __call__(self, entry: ModelEntry) -> FakeServed:
        self.opened.append(entry.name)
        if self.gate is not None:
            await self.gate.wait()
        if entry.name in self.broken:
            raise OSError(f"/srv/secret/{entry.name}/onnx/decoder.onnx is truncated")
        return FakeServed(FakeBatcher(self.closed, entry.name))


def entries(model_dir: Path, names: list[str]) -> list[ModelEntry]:
    info = read_model_dir(model_dir)
    out = []
    for i, name in enumerate(names):
        renamed = info.__class__(**{**info.__dict__, "path": model_dir.parent / name, "source_lang": f"l{i}"})
        out.append(ModelEntry(renamed, "fp32", "cpu"))
    return out


def test_the_least_recently_used_idle_model_is_evicted(served_model_dir: Path) -> None:
    async def scenario() -> None:
        opener = Opener()
        a, b, c = entries(served_model_dir, ["a", "b", "c"])
        registry = Registry([a, b, c], opener, max_loaded=2)
        for entry in (a, b, a):  # b is now the least recently used
            async with registry.use(entry):
                pass
        assert opener.opened == ["a", "b"] and opener.closed == []
        async with registry.use(c):
            assert [e.name for e in registry.loaded] == ["a", "c"] and opener.closed == ["b"]
        async with registry.use(a), registry.use(b):  # a held: c, the older one, is idle and goes
            assert opener.closed == ["b", "c"] and [e.status for e in (a, b, c)] == ["loaded", "loaded", "unloaded"]
            with pytest.raises(ModelUnavailable, match="all 2 loaded models are busy"):
                async with registry.use(c):
                    pass
        assert (a.in_flight, b.in_flight, c.in_flight) == (0, 0, 0)
        await registry.close()
        assert sorted(opener.closed) == ["a", "b", "b", "c"]

    asyncio.run(scenario())


def test_concurrent_first_requests_share_one_load(served_model_dir: Path) -> None:
    async def scenario() -> None:
        opener = Opener(gate=asyncio.Event())
        (a,) = entries(served_model_dir, ["a"])
        registry = Registry([a], opener)
        waiting = [asyncio.ensure_future(registry.load(a)) for _ in range(5)]
        await asyncio.sleep(0)
        waiting[0].cancel()  # a client that leaves does not cancel the load the others wait for
        opener.gate.set()
        served = await asyncio.gather(*waiting[1:])
        assert opener.opened == ["a"] and all(s is served[0] for s in served) and a.status == "loaded"

    asyncio.run(scenario())


def test_a_model_that_fails_to_load_answers_503_and_is_retried_later(
    served_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        opener = Opener(broken={"b"})
        a, b = entries(served_model_dir, ["a", "b"])
        registry = Registry([a, b], opener, retry_failed_s=3600)
        with pytest.raises(ModelUnavailable) as failed:
            await registry.load(b)
        assert "b (l1→tgt) failed to load" in str(failed.value) and "/srv/secret" not in str(failed.value)
        assert "/srv/secret/b" in caplog.text  # the operator learns which file
        with pytest.raises(ModelUnavailable):  # not retried at once: no reload per request
            await registry.load(b)
        assert opener.opened == ["b"] and b.status == "failed"
        await registry.load(a)  # the others keep working
        registry.retry_failed_s = 0
        opener.broken.clear()
        await registry.load(b)
        assert b.status == "loaded" and opener.opened == ["b", "a", "b"]

    asyncio.run(scenario())


def tiny_opus_mt(tmp: Path) -> Path:
    """A tiny random Marian model saved as OPUS-MT ships them (config + weights, source/target SentencePiece
    models, vocab.json), then imported by mt-import and exported by mt-export: de→fr, named opus-mt-de-fr."""
    import random

    import sentencepiece as spm
    import torch
    import transformers

    from export.cli import main as mt_export
    from importers.cli import main as mt_import

    rng = random.Random(0)
    words = {"source": ["haus", "hund", "katze", "baum", "rot"], "target": ["maison", "chien", "chat", "arbre"]}
    hf_dir = tmp / "hf-opus-mt-de-fr"
    hf_dir.mkdir()
    for side, vocabulary in words.items():
        lines = [" ".join(rng.choices(vocabulary, k=rng.randint(2, 6))) for _ in range(200)]
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(tmp / side),
            vocab_size=28,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        (hf_dir / f"{side}.spm").write_bytes((tmp / f"{side}.model").read_bytes())
    processors = [spm.SentencePieceProcessor(model_file=str(hf_dir / f"{side}.spm")) for side in words]
    pieces = sorted({p for sp in processors for p in sp.id_to_piece(list(range(3, sp.get_piece_size())))})
    vocab = {"</s>": 0, "<unk>": 1, **{p: i + 2 for i, p in enumerate(pieces)}}
    vocab["<pad>"] = len(vocab)
    (hf_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    torch.manual_seed(0)
    config = transformers.MarianConfig(
        vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=vocab["<pad>"], eos_token_id=0, decoder_start_token_id=vocab["<pad>"],
    )  # fmt: skip
    transformers.MarianMTModel(config).eval().save_pretrained(hf_dir)
    out = tmp / "opus-mt-de-fr"
    assert mt_import(["marian", str(hf_dir), str(out), "--source", "de", "--target", "fr"]) == 0
    assert mt_export([str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def lru_server(
    served_model_dir: Path, reverse_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """``mt-serve`` with three models (src→tgt, tgt→src, de→fr) and room for two."""
    marian = tiny_opus_mt(tmp_path_factory.mktemp("marian"))
    log = tmp_path_factory.mktemp("logs") / "lru_server.log"
    models = [served_model_dir, reverse_model_dir, marian]
    running = start_server(["-m", "service.cli"], models, log, MT_MAX_LOADED_MODELS="2")
    yield running
    assert running.stop() in (0, -signal.SIGTERM), running.log_tail()


def statuses(server: Server) -> dict[str, str]:
    return {m["name"]: m["status"] for m in httpx.get(f"{server.url}/v1/models").json()["models"]}


def translate(server: Server, text: str, source: str, target: str) -> dict:
    response = httpx.post(
        f"{server.url}/v1/translate", json={"text": text, "source": source, "target": target}, timeout=60
    )
    assert response.status_code == 200, (response.text, server.log_tail())
    return response.json()


def test_three_models_two_loaded_route_by_pair_and_evict_the_least_recently_used(
    lru_server: Server, copy_sources: list[str]
) -> None:
    server, sentence = lru_server, copy_sources[0]
    # Ready with the first model; the second (room for two) loads in the background; the third waits.
    for _ in range(600):
        if statuses(server)["copy-model-back"] in ("loaded", "failed"):
            break
        httpx.get(f"{server.url}/health/ready")  # a short pause that asks the server something useful
    assert statuses(server) == {"copy-model": "loaded", "copy-model-back": "loaded", "opus-mt-de-fr": "unloaded"}
    languages = {item["code"]: item["targets"] for item in httpx.get(f"{server.url}/languages").json()}
    assert languages == {"src": ["tgt"], "tgt": ["src"], "de": ["fr"], "fr": []}  # unloaded ones listed too

    # src→tgt is used last, so tgt→src is the least recently used when de→fr loads.
    assert translate(server, sentence, "src", "tgt") == {"model": "copy-model", "translations": [{"text": sentence}]}
    first = translate(server, "hund katze", "de", "fr")
    assert first["model"] == "opus-mt-de-fr" and first["translations"][0]["text"].strip()
    assert statuses(server) == {"copy-model": "loaded", "copy-model-back": "unloaded", "opus-mt-de-fr": "loaded"}
    assert server.metric("mt_model_evictions_total") == 1

    # The evicted model reloads on its next request (evicting src→tgt, now the least recently used) ...
    back = translate(server, sentence, "tgt", "src")
    assert back == {"model": "copy-model-back", "translations": [{"text": sentence}]}
    assert statuses(server) == {"copy-model": "unloaded", "copy-model-back": "loaded", "opus-mt-de-fr": "loaded"}
    # ... and so does the next one; the same input gets the same translation from a reloaded model.
    assert translate(server, sentence, "src", "tgt")["translations"] == [{"text": sentence}]
    assert translate(server, "hund katze", "de", "fr") == first
    assert server.metric("mt_model_evictions_total") == 4
    libre = httpx.post(f"{server.url}/translate", json={"q": "hund katze", "source": "de", "target": "fr"})
    assert libre.status_code == 200 and libre.json()["translatedText"] == first["translations"][0]["text"]
    log = server.log_tail()
    assert "evicting model copy-model-back (tgt→src), the least recently used, to load opus-mt-de-fr" in log
