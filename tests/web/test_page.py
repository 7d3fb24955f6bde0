"""The demo page in headless Chromium against a real server with the copy model: translation, n-best,
attention heatmap (subword and word level), errors shown, narrow screens."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from headless import CHROMIUM, INSTALL_HINT
from live_server import Server
from playwright.sync_api import Browser, Page, expect

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no {CHROMIUM}: {INSTALL_HINT}")

WORD_START = "\u2581"

READ_HEATMAP = """table => {
    const rows = [...table.querySelectorAll("tbody tr")];
    const cells = rows.map(tr => [...tr.querySelectorAll("td")]);
    return {
        view: table.dataset.view,
        cols: [...table.querySelectorAll("thead th:not(.corner)")].map(th => th.dataset.token),
        rows: rows.map(tr => tr.querySelector("th").dataset.token),
        shown: table.innerText,
        weights: cells.map(row => row.map(td => Number(td.dataset.weight))),
        titles: cells.map(row => row.map(td => td.title)),
        aligned: cells.flatMap((row, t) => row.flatMap((td, s) => td.classList.contains("aligned") ? [[s, t]] : [])),
    };
}"""


@pytest.fixture(scope="module")
def sentence(copy_task_dir: Path) -> str:
    """A held-out copy-task sentence of several words (the model copies it exactly)."""
    lines = (copy_task_dir / "test.src").read_text(encoding="utf-8").splitlines()
    return next(line for line in lines if len(line.split()) >= 4)


def read_heatmap(page: Page) -> dict:
    return page.locator("#heatmap").evaluate(READ_HEATMAP)


def word_index(pieces: list[str]) -> np.ndarray:
    return np.cumsum([i > 0 and piece.startswith(WORD_START) for i, piece in enumerate(pieces)])


def word_level(attention: dict) -> np.ndarray:
    """Sum over a source word's subwords, mean over a target word's subwords (what the page documents)."""
    src, tgt = word_index(attention["source_tokens"]), word_index(attention["target_tokens"])
    summed = np.zeros((tgt[-1] + 1, src[-1] + 1))  # (target words, source words)
    np.add.at(summed, (tgt[:, None], src[None, :]), np.array(attention["weights"]))
    return summed / np.bincount(tgt)[:, None]


def translate_in_page(page: Page, text: str, beam_size: int = 4, n_best: int = 1) -> None:
    page.get_by_label("Text to translate", exact=True).fill(text)
    page.get_by_label("Beam size", exact=True).fill(str(beam_size))
    page.get_by_label("N-best", exact=True).fill(str(n_best))
    page.get_by_role("button", name="Translate").click()


def test_translation_alternatives_and_heatmap_match_the_api(page: Page, web_server: Server, sentence: str) -> None:
    expect(page.get_by_label("From", exact=True)).to_have_value("src")
    expect(page.get_by_label("To", exact=True)).to_have_value("tgt")
    translate_in_page(page, sentence, beam_size=4, n_best=2)
    expect(page.locator("#translation")).to_have_text(sentence)  # the copy model copies
    expect(page.get_by_role("status")).to_have_text(f"Translation: {sentence}")  # read out by screen readers
    expect(page.get_by_role("button", name="Translate")).to_be_enabled()

    body = {"text": sentence, "source": "src", "target": "tgt", "beam_size": 4, "n_best": 2}
    api = httpx.post(f"{web_server.url}/v1/translate", json={**body, "return_scores": True, "return_attention": True})
    assert api.status_code == 200, api.text
    item = api.json()["translations"][0]
    attention = item["attention"]

    alternatives = page.locator("#alternatives li")
    expect(alternatives).to_have_count(len(item["alternatives"]))
    for li, alt in zip(alternatives.all(), item["alternatives"], strict=True):
        assert li.locator(".alt-text").text_content() == alt["text"]
        assert li.locator(".alt-score").text_content() == f"{alt['score']:.4f}"
    expect(page.locator("#score")).to_contain_text(f"{item['score']:.4f}")

    # Subword view: target tokens down, source tokens across, the API's weights in the cells.
    grid = read_heatmap(page)
    assert grid["view"] == "subword"
    assert grid["rows"] == attention["target_tokens"]
    assert grid["cols"] == attention["source_tokens"]
    assert WORD_START not in grid["shown"]  # drawn as a left mark, not as the raw "▁"
    assert [len(row) for row in grid["weights"]] == [len(attention["source_tokens"])] * len(attention["target_tokens"])
    np.testing.assert_allclose(grid["weights"], attention["weights"], rtol=0, atol=1e-12)
    t, s = len(grid["rows"]) - 1, len(grid["cols"]) // 2
    row, col = (grid[k][i].replace(WORD_START, "") for k, i in (("rows", t), ("cols", s)))
    assert grid["titles"][t][s] == f"{row} ← {col}: {attention['weights'][t][s]:.4f}"

    # Word view: one row/column per word, aggregated weights, the API's alignment outlined.
    page.get_by_label("Words", exact=True).check()
    expect(page.locator("#heatmap")).to_have_attribute("data-view", "word")
    words = read_heatmap(page)
    assert [w.replace(WORD_START, "") for w in words["rows"]] == sentence.split()
    assert [w.replace(WORD_START, "") for w in words["cols"]] == sentence.split()
    assert np.array(words["weights"]).shape == (len(sentence.split()), len(sentence.split()))
    np.testing.assert_allclose(words["weights"], word_level(attention), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.sum(words["weights"], axis=1), 1.0, atol=1e-6)
    assert sorted(words["aligned"]) == sorted(attention["alignment"])

    page.get_by_label("Subwords", exact=True).check()
    expect(page.locator("#heatmap tbody tr")).to_have_count(len(attention["target_tokens"]))


def test_pickers_offer_the_loaded_pairs_by_name(page: Page, sentence: str) -> None:
    source = page.get_by_label("From", exact=True)
    values = source.locator("option").evaluate_all("options => options.map(o => o.value)")
    assert sorted(values) == ["de", "src"]
    expect(source.locator('option[value="de"]')).to_have_text("German (de)")  # a name, not only the code
    source.select_option("de")
    expect(page.get_by_label("To", exact=True).locator("option")).to_have_text(["English (en)"])
    expect(page.locator("#model-info")).to_contain_text("copy-model-back: German (de) → English (en)")
    translate_in_page(page, sentence, beam_size=2)
    expect(page.locator("#translation")).to_have_text(sentence)


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("too_long", ["Error 413", "characters; send at most", "MT_MAX_CHARS"]),
        ("beam_forced", ["Error 422", "beam_size", "less than or equal to 16"]),
        ("network_down", ["Could not reach the server"]),
    ],
)
def test_api_errors_are_shown_in_the_page(
    page: Page, sentence: str, max_chars: int, case: str, says: list[str]
) -> None:
    text, beam = sentence, 4
    if case == "too_long":
        text = " ".join([sentence] * (max_chars // len(sentence) + 2))
        says = [*says, f"at most {max_chars}"]
    elif case == "beam_forced":  # the page's own bounds removed: the server must still refuse, visibly
        page.locator("#beam-size").evaluate("input => input.removeAttribute('max')")
        beam = 17
    else:
        page.route("**/v1/translate", lambda route: route.abort("connectionrefused"))
    translate_in_page(page, text, beam_size=beam)
    error = page.get_by_role("alert")
    expect(error).to_be_visible()
    for phrase in says:
        expect(error).to_contain_text(phrase)
    expect(page.locator("#results")).to_be_hidden()
    expect(page.get_by_role("button", name="Translate")).to_be_enabled()

    if case == "too_long":  # a good request afterwards clears the error
        translate_in_page(page, sentence)
        expect(page.locator("#translation")).to_have_text(sentence)
        expect(error).to_be_hidden()


def test_narrow_screen_scrolls_the_heatmap_not_the_page(page: Page, sentence: str) -> None:
    page.set_viewport_size({"width": 360, "height": 740})
    translate_in_page(page, " ".join([sentence] * 4), beam_size=1)
    expect(page.locator("#heatmap tbody tr").first).to_be_visible()
    page_width, heatmap_box, heatmap_content = page.evaluate(
        """() => {
            const box = document.querySelector(".heatmap-scroll");
            return [document.documentElement.scrollWidth, box.clientWidth, box.scrollWidth];
        }"""
    )
    assert page_width <= 360
    assert heatmap_content > heatmap_box  # the wide heatmap scrolls inside its own box


def test_attention_can_be_left_off(page: Page, web_server: Server, sentence: str) -> None:
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/translate") else None)
    page.get_by_label("Attention heatmap", exact=True).uncheck()
    translate_in_page(page, sentence)
    expect(page.locator("#translation")).to_have_text(sentence)
    expect(page.locator("#attention-block")).to_be_hidden()
    assert [body["return_attention"] for body in sent] == [False]


def test_a_text_too_long_for_the_heatmap_is_translated_without_it(
    page: Page, web_server: Server, sentence: str, max_chars: int, max_attention_cells: int
) -> None:
    text = "\n".join([sentence] * (max_chars // (len(sentence) + 1)))  # one sentence per line: copied exactly
    body = {"text": text, "source": "src", "target": "tgt", "return_attention": True}
    refused = httpx.post(f"{web_server.url}/v1/translate", json=body, timeout=60)
    assert refused.status_code == 413 and "MT_MAX_ATTENTION_CELLS" in refused.json()["detail"]  # the premise
    translate_in_page(page, text)
    expect(page.locator("#translation")).to_have_text(text)
    expect(page.locator("#note")).to_have_text(
        "This text is too long for an attention heatmap, so it was translated without one."
    )
    expect(page.locator("#attention-block")).to_be_hidden()
    expect(page.get_by_role("alert")).to_be_hidden()


def test_favicon_is_served(page: Page, web_server: Server) -> None:
    href = page.locator('link[rel="icon"]').get_attribute("href")
    response = httpx.get(f"{web_server.url}{href}")
    assert response.status_code == 200 and response.headers["content-type"].startswith("image/svg+xml")
    assert response.text.lstrip().startswith("<svg")


def test_a_tap_shows_a_cells_value(browser: Browser, web_server: Server, sentence: str) -> None:
    """Touch screens have no hover: a tap on a cell writes its title (target ← source: weight) under the map."""
    context = browser.new_context(base_url=web_server.url, viewport={"width": 360, "height": 740}, has_touch=True)
    page = context.new_page()
    page.goto("/")
    expect(page.locator("#translate")).to_be_enabled()
    translate_in_page(page, sentence)
    cell = page.locator("#heatmap tbody tr").nth(1).locator("td").nth(1)
    expect(cell).to_be_visible()
    cell.tap()
    title = cell.get_attribute("title")
    assert title and title.endswith(f"{float(cell.get_attribute('data-weight')):.4f}")
    expect(page.locator("#cell-info")).to_have_text(title)
    context.close()
