"""The LibreTranslate-compatible routes over real HTTP, driven by the published ``libretranslatepy`` client where
it can (translate, auto, languages, detect, an error) and by LibreTranslate's JSON and form bodies where that
client has no parameter (a list of ``q``, ``format``, ``alternatives``).

The server runs the trained copy-task model twice, declared as de→en and en→de, so that detection has two real
languages to choose between and every answer can be compared with the copied input or with ``/v1``.
"""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from libretranslatepy import LibreTranslateAPI
from live_server import Server, start_server

from model.decoding import DecodingOptions
from service.engine import Engine, word_index

GERMAN = "Der kleine Hund läuft schnell über die grüne Wiese."
ENGLISH = "The little dog runs quickly across the green meadow."


def _declare(source: Path, target: Path, src: str, tgt: str) -> Path:
    shutil.copytree(source, target)
    meta = json.loads((target / "model.json").read_text(encoding="utf-8"))
    meta["source_lang"], meta["target_lang"] = src, tgt
    (target / "model.json").write_text(json.dumps(meta), encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def libre(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("libre")
    models = [
        _declare(served_model_dir, root / "copy-de-en", "de", "en"),
        _declare(served_model_dir, root / "copy-en-de", "en", "de"),
    ]
    running = start_server(["-m", "service.cli"], models, root / "server.log", MT_MAX_CHARS="500")
    yield running
    assert running.stop() in (0, -signal.SIGTERM), running.log_tail()


@pytest.fixture
def client(libre: Server) -> LibreTranslateAPI:
    return LibreTranslateAPI(libre.url)


def post(server: Server, path: str, **body) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def sentences_by_model(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("mt_sentences_total{"):
            out[line.split('model="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def v1(server: Server, text: str, source: str, target: str) -> str:
    response = httpx.post(
        f"{server.url}/v1/translate", json={"text": text, "source": source, "target": target}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()["translations"][0]["text"]


def test_published_client_translates(client: LibreTranslateAPI, copy_sources: list[str]) -> None:
    for text in copy_sources[:5]:
        assert client.translate(text, "de", "en") == text  # the copy model copies held-out sentences exactly
    # BCP-47 tags in any spelling name the same model.
    assert client.translate(copy_sources[5], "DE", "en-US") == copy_sources[5]
    assert client.translate(copy_sources[6], "de_DE", "eng") == copy_sources[6]


def test_list_of_q_as_json_and_as_repeated_form_fields(libre: Server, copy_sources: list[str]) -> None:
    texts = copy_sources[:4]
    response = post(libre, "/translate", q=texts, source="de", target="en")
    assert response.status_code == 200, response.text
    assert response.json() == {"translatedText": texts}
    form = httpx.post(
        f"{libre.url}/translate", data={"q": texts, "source": "de", "target": "en", "format": "text"}, timeout=60
    )
    assert form.status_code == 200, form.text
    assert form.json() == {"translatedText": texts}


def test_auto_detects_the_language_and_routes_to_its_model(libre: Server, client: LibreTranslateAPI) -> None:
    before = sentences_by_model(libre)
    assert client.translate(GERMAN, "auto", "en") == v1(libre, GERMAN, "de", "en")
    response = post(libre, "/translate", q=[GERMAN, ENGLISH], source="auto", target="en")
    assert response.status_code == 400  # the English text has no model into English
    assert "no model translates en→en" in response.json()["error"]
    response = post(libre, "/translate", q=ENGLISH, source="auto", target="de")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["detectedLanguage"]["language"] == "en"
    assert 50 < body["detectedLanguage"]["confidence"] <= 100
    assert body["translatedText"] == v1(libre, ENGLISH, "en", "de")
    after = sentences_by_model(libre)
    assert after["copy-en-de"] - before.get("copy-en-de", 0) == 2  # ENGLISH, through /translate and /v1
    assert after["copy-de-en"] - before.get("copy-de-en", 0) == 2  # GERMAN likewise


def test_languages(client: LibreTranslateAPI) -> None:
    assert client.languages() == [
        {"code": "de", "name": "German", "targets": ["en"]},
        {"code": "en", "name": "English", "targets": ["de"]},
    ]


def test_detect(client: LibreTranslateAPI) -> None:
    german = client.detect(GERMAN)
    assert [d["language"] for d in german] == ["de", "en"]
    assert german[0]["confidence"] > 90
    assert sum(d["confidence"] for d in german) == pytest.approx(100, abs=0.1)
    assert client.detect(ENGLISH)[0]["language"] == "en"


def clearly_aligned(model_dir: Path, sentences: list[str]) -> tuple[str, str]:
    """Two sentences whose concatenation the tiny copy model aligns word for word with a clear margin, so that
    the markup test checks tag placement, not near-ties in the tiny model's attention (which float noise from
    what shares a decoder step can flip)."""
    engine = Engine.load(model_dir, device="cpu", variant="fp32", threads=1)
    best, best_margin = None, 0.0
    for a, b in itertools.pairwise(sentences):
        if len(b.split()) < 3:
            continue
        src = engine.encode([f"{a} {b}"])[0]
        attention = engine.translate_batch([src], DecodingOptions(return_attention=True))[0].attention
        src_words, tgt_words = word_index(attention.source_tokens), word_index(attention.target_tokens)
        if src_words[-1] != tgt_words[-1]:
            continue
        summed = np.zeros((tgt_words[-1] + 1, src_words[-1] + 1))  # (target words, source words)
        np.add.at(summed, (tgt_words[:, None], src_words[None, :]), attention.weights)
        top2 = np.sort(summed, axis=1)[:, -2:]
        diagonal = (summed.argmax(axis=1) == np.arange(len(summed))).all()
        margin = float((top2[:, 1] - top2[:, 0]).min())
        if diagonal and margin > best_margin:
            best, best_margin = (a, b), margin
    assert best is not None and best_margin > 0.05, "no clearly aligned sentence pair among the copy sources"
    return best


def test_html_keeps_tags_attributes_entities_and_code(
    libre: Server, copy_sources: list[str], served_model_dir: Path
) -> None:
    a, b = clearly_aligned(served_model_dir, copy_sources[:40])
    c = copy_sources[2]
    first, *middle, last = b.split()
    assert middle, "the test needs a sentence of three words or more"
    html = (
        f'<div class="x" title="Tom &amp; Jerry"><p>{a} <b>{first} <i>{" ".join(middle)}</i></b> {last}</p>'
        f"<!-- a comment --><pre>keep  &lt;this&gt;\n as is</pre><code>{c} &amp;</code>"
        f'<p translate="no">{c} <b>{c}</b></p><ul><li>{c}</li><li><a href="/x?a=1&amp;b=2">{a}</a></li></ul></div>'
    )
    response = post(libre, "/translate", q=html, source="de", target="en", format="html")
    assert response.status_code == 200, response.text
    assert response.json() == {"translatedText": html}  # the copy model copies: the markup must come back as is


def test_alternatives_come_from_the_n_best(libre: Server, copy_sources: list[str]) -> None:
    response = post(libre, "/translate", q=copy_sources[:2], source="de", target="en", alternatives=2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["translatedText"] == copy_sources[:2]
    n_best = httpx.post(
        f"{libre.url}/v1/translate",
        json={"text": copy_sources[:2], "source": "de", "target": "en", "beam_size": 4, "n_best": 3},
        timeout=60,
    ).json()["translations"]
    assert body["alternatives"] == [[alt["text"] for alt in t["alternatives"]] for t in n_best]
    assert all(len(alts) == 2 for alts in body["alternatives"])


def test_errors_in_libretranslates_shape(libre: Server, client: LibreTranslateAPI) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        client.translate("w01", "de", "fr")
    assert caught.value.code == 400
    assert "no model translates de→fr; available pairs: de→en, en→de" in json.loads(caught.value.read())["error"]
    missing = post(libre, "/translate", source="de", target="en")
    assert (missing.status_code, missing.json()) == (400, {"error": "Invalid request: q: Field required"})
    too_long = post(libre, "/translate", q="w01 " * 200, source="de", target="en")
    assert too_long.status_code == 413
    assert "at most 500 per text (MT_MAX_CHARS)" in too_long.json()["error"]
    bad = httpx.post(f"{libre.url}/translate", content=b"{nope", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("Invalid request: the body is not JSON")
    assert set(bad.json()) == {"error"}


def test_v1_takes_bcp47_spellings_and_auto(libre: Server, copy_sources: list[str]) -> None:
    # "DE" and "de-DE" were 404 before the tags were normalised.
    for source, target in (("DE", "EN"), ("de-DE", "en-US"), ("deu", "en_GB")):
        assert v1(libre, copy_sources[0], source, target) == copy_sources[0]
    response = httpx.post(f"{libre.url}/v1/translate", json={"text": ENGLISH, "source": "auto", "target": "de"})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "copy-en-de"
    response = httpx.post(f"{libre.url}/v1/translate", json={"text": "", "source": "auto", "target": "de"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("cannot detect the source language: the text is empty")


@pytest.fixture(scope="module")
def keyed(libre: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The same two models behind MT_API_KEYS_FILE (one key, "lt-key")."""
    root = tmp_path_factory.mktemp("keyed")
    keys = root / "keys.txt"
    keys.write_text("lt-key\n", encoding="utf-8")
    models = [Path(libre.log.parent) / "copy-de-en", Path(libre.log.parent) / "copy-en-de"]
    running = start_server(["-m", "service.cli"], models, root / "server.log", MT_API_KEYS_FILE=str(keys))
    yield running
    assert running.stop() in (0, -signal.SIGTERM), running.log_tail()


def test_api_key_field_is_checked(keyed: Server, copy_sources: list[str]) -> None:
    text = copy_sources[0]
    assert LibreTranslateAPI(keyed.url, api_key="lt-key").translate(text, "de", "en") == text
    assert LibreTranslateAPI(keyed.url, api_key="lt-key").languages()[0]["code"] == "de"
    for key, status in ((None, 401), ("wrong", 403)):
        with pytest.raises(urllib.error.HTTPError) as caught:
            LibreTranslateAPI(keyed.url, api_key=key).translate(text, "de", "en")
        assert caught.value.code == status
        assert set(json.loads(caught.value.read())) == {"error"}
    bearer = httpx.post(
        f"{keyed.url}/detect", json={"q": GERMAN}, headers={"Authorization": "Bearer lt-key"}, timeout=60
    )
    assert bearer.status_code == 200 and bearer.json()[0]["language"] == "de"


def test_auto_with_html_detects_the_text_not_the_markup(libre: Server) -> None:
    # Tag names and attributes are English-looking; lingua reads this raw document as English (0.74).
    html = (
        '<div class="navigation-header"><a href="/home/welcome-page" title="Go back home">Zurück</a> '
        '<span class="button primary">Weiter</span></div>'
    )
    response = post(libre, "/translate", q=html, source="auto", target="en", format="html")
    assert response.status_code == 200, response.text
    assert response.json()["detectedLanguage"]["language"] == "de"
