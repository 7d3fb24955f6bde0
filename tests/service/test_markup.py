"""HTML in, HTML out: what is translated, what is kept byte for byte, and where inline tags land."""

from __future__ import annotations

import pytest

from service.markup import Translated, parse


def identity(html: str) -> str:
    """Every segment "translated" into itself, with the diagonal alignment."""
    doc = parse(html)
    return doc.render([Translated(t, [(i, i) for i in range(len(t.split()))]) for t in doc.texts])


def upper(html: str, aligned: bool = True) -> str:
    doc = parse(html)
    return doc.render(
        [Translated(t.upper(), [(i, i) for i in range(len(t.split()))] if aligned else None) for t in doc.texts]
    )


@pytest.mark.parametrize(
    "html",
    [
        "<p>Ein <b>Hund</b> läuft.</p>",
        '<!DOCTYPE html><html lang="de"><head><meta charset="utf-8"><title>Titel</title></head>'
        '<body><p class="x" data-a=\'1\'>Tom &amp; Jerry&nbsp;laufen &#228; &copy;. <a href="/x?a=1&amp;b=2">Hier</a>'
        '</p><!-- ein Kommentar --><pre>  code &lt;x&gt; </pre><p translate="no">Nicht <i>hier</i></p>'
        "<script>if (a < b) { x = '<p>' }</script><br/><img src=a.png alt=\"Bild\">Ende</body></html>",
        "<ul>\n  <li>eins</li>\n  <li>zwei <em>drei</em></li>\n</ul>\n",
        "<b>eins<p>zwei</b> drei",  # misnested: kept as written
        "<P CLASS=Big>Gross <B>geschrieben</B></P>",
        "Kein Markup, nur Text & ein Zeichen.",
    ],
)
def test_an_identity_translation_gives_the_document_back_byte_for_byte(html: str) -> None:
    assert identity(html) == html


def test_only_text_nodes_outside_untranslatable_parts_are_translated() -> None:
    html = (
        '<p title="ein Titel">ein <b>Hund</b></p><code>ein code</code><pre>ein pre</pre>'
        '<p translate="no">ein nein</p><span class="notranslate">ein span</span><kbd>ein</kbd>'
        "<style>p { color: red }</style><!-- ein -->"
    )
    assert parse(html).texts == ["ein Hund"]
    assert upper(html) == html.replace("ein <b>Hund</b>", "EIN <b>HUND</b>")


def test_entities_keep_their_spelling_and_text_is_escaped() -> None:
    doc = parse("<p>Tom &amp; Jerry &copy; &#228;</p>")
    assert doc.texts == ["Tom & Jerry © ä"]
    assert doc.render([Translated("ä © & <b> Jerry")]) == "<p>&#228; &copy; &amp; &lt;b&gt; Jerry</p>"


def test_inline_tags_follow_their_words_through_the_alignment() -> None:
    doc = parse('<p>A <b>B</b> C <a href="#d">D</a></p>')
    assert doc.texts == ["A B C D"]
    # "d c b a": target word 0 is aligned to source word 3, and so on.
    reordered = Translated("d c b a", [(3, 0), (2, 1), (1, 2), (0, 3)])
    assert doc.render([reordered]) == '<p><a href="#d">d</a> c <b>b</b> a</p>'


def test_nested_tags_wrap_the_hull_of_their_words() -> None:
    doc = parse("<p>Der <b>sehr <i>kleine</i> Hund</b> läuft</p>")
    translated = Translated("The very small dog runs", [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)])
    assert doc.render([translated]) == "<p>The <b>very <i>small</i> dog</b> runs</p>"
    # Word order changes inside the element: the hull still holds them; nesting stays valid.
    swapped = Translated("The dog very small runs", [(0, 0), (3, 1), (1, 2), (2, 3), (4, 4)])
    assert doc.render([swapped]) == "<p>The <b>dog very <i>small</i></b> runs</p>"


def test_crossing_alignments_fall_back_to_keeping_tags_in_order() -> None:
    doc = parse("<p><b>A B</b> <i>C D</i></p>")
    crossing = Translated("w x y z", [(0, 0), (2, 1), (1, 2), (3, 3)])  # <b> would be 0-2, <i> 1-3: they cross
    assert doc.render([crossing]) == "<p><b>w x</b> <i>y z</i></p>"


def test_without_alignment_tags_are_placed_in_order_with_their_text() -> None:
    doc = parse("<p>eins <b>zwei</b> drei <i>vier</i></p>")
    assert doc.render([Translated("one two three four five six")]) == (
        "<p>one two <b>three</b> four <i>five six</i></p>"  # positions scaled by 6 / 4
    )
    assert doc.render([Translated("")]) == "<p><b></b><i></i></p>"  # nothing translated: no tag lost


def test_unaligned_empty_elements_stay_anchored() -> None:
    doc = parse('<p>Ein <span id="m"></span>Hund <img src="h.png"> bellt</p>')
    out = doc.render([Translated("A dog barks", [(0, 0), (1, 1), (2, 2)])])
    assert out == '<p>A <span id="m"></span>dog <img src="h.png">barks</p>'
