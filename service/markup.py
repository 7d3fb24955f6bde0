"""HTML in, HTML out: translate the text nodes, keep every tag, attribute, comment and untranslatable part.

The document is read by the standard library's HTML tokenizer (``html.parser``) and cut into *segments*: the
text between block-level tags (``<p>``, ``<li>``, ``<br>``, ``<td>``, ...), with the inline elements inside it
(``<b>``, ``<a href=...>``, ``<span>``, ...). Everything else is kept byte for byte as it was written: tags
with their attributes, comments, doctype, and the contents of ``<code>``, ``<pre>``, ``<script>``,
``<style>``, ``<kbd>``, ``<samp>``, ``<textarea>`` and of any element with ``translate="no"`` or class
``notranslate``.

A segment is translated as one text (its whitespace runs collapsed, as a browser shows them). Its inline
elements then go back around the words they wrapped: the words a tag covered in the source are mapped to
target words through the word alignment of the attention (``Translated.alignment``), and the tag wraps the
span of those target words. When there is no alignment, or the aligned spans would cross each other, every
tag is placed by a monotone map from source word positions to target word positions instead, which keeps
the tags in their order and nesting with the text around them. Entities in translated text come back with
their original spelling (``&nbsp;``, ``&copy;``, ``&#228;``); ``&``, ``<`` and ``>`` are escaped.
"""

from __future__ import annotations

import html
import itertools
import re
from bisect import bisect_left
from dataclasses import dataclass, field
from html.parser import HTMLParser

# Inline elements stay inside a segment; every other tag ends it. A <code> inside a sentence ends it too
# (its text is kept as written, and a placeholder could not survive a model trained on plain text).
INLINE = frozenset(
    ["a", "abbr", "b", "bdi", "bdo", "cite", "data", "dfn", "em", "font", "i", "img", "ins", "del", "mark", "q"]
    + ["s", "small", "span", "strong", "sub", "sup", "time", "u", "wbr"]
)
UNTRANSLATED = frozenset(["code", "pre", "script", "style", "kbd", "samp", "textarea", "svg", "math", "template"])
VOID = frozenset(["area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source"])
VOID |= {"track", "wbr"}
_WORD = re.compile(r"[^ \t\n\r\f]+")  # HTML's whitespace is ASCII only: a no-break space joins two words


@dataclass(frozen=True)
class Translated:
    """A segment's translation and its word alignment (``(source word, target word)`` pairs) when known."""

    text: str
    alignment: list[tuple[int, int]] | None = None


@dataclass
class _Element:
    """An inline element of a segment: its raw tags and the source words it wraps ([first, end) word indices;
    ``first == end`` for an element around no word, kept as an anchor before word ``first``)."""

    open_raw: str
    close_raw: str
    first: int = 0
    end: int = 0
    children: list[_Element] = field(default_factory=list)
    glued: bool = False  # a stray close tag: stays right after the word before it
    # Where it lands in the target: [start, stop) word indices, set by _place.
    start: int = 0
    stop: int = 0


@dataclass
class _Segment:
    lead: str  # leading / trailing whitespace, kept as written (outside every inline element)
    trail: str
    words: list[str]  # source words (whitespace collapsed)
    roots: list[_Element]  # top-level inline elements, in source order
    spelling: dict[str, str]  # character -> the entity that wrote it in the source

    @property
    def text(self) -> str:
        return " ".join(self.words)


class _Tokens(HTMLParser):
    """Every token of a document with its start offset, so that each token's raw text is a slice of it."""

    def __init__(self, source: str) -> None:
        super().__init__(convert_charrefs=False)
        self.source = source
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", source)]
        self.tokens: list[tuple[str, str, dict[str, str | None], int]] = []  # kind, tag, attrs, start

    def _add(self, kind: str, tag: str = "", attrs: list | None = None) -> None:
        line, column = self.getpos()
        self.tokens.append((kind, tag, dict(attrs or []), self.line_starts[line - 1] + column))

    def handle_starttag(self, tag, attrs):
        self._add("start", tag, attrs)

    def handle_startendtag(self, tag, attrs):
        self._add("void", tag, attrs)

    def handle_endtag(self, tag):
        self._add("end", tag)

    def handle_data(self, data):
        self._add("text")

    def handle_entityref(self, name):
        self._add("entity")

    def handle_comment(self, data):  # comments, <!DOCTYPE>, <?pi>, <![CDATA[...]]>: kept as written
        self._add("other")

    handle_charref = handle_entityref
    handle_decl = handle_pi = unknown_decl = handle_comment

    def raw_tokens(self) -> list[tuple[str, str, dict[str, str | None], str]]:
        self.feed(self.source)
        self.close()
        starts = [start for *_, start in self.tokens] + [len(self.source)]
        return [(k, t, a, self.source[s:e]) for (k, t, a, s), e in zip(self.tokens, starts[1:], strict=True)]


def _untranslatable(tag: str, attrs: dict[str, str | None]) -> bool:
    classes = (attrs.get("class") or "").split()
    return tag in UNTRANSLATED or (attrs.get("translate") or "").lower() == "no" or "notranslate" in classes


class _SegmentBuilder:
    """Collects one segment's text and inline tags; ``finish`` turns them into a _Segment (or raw text)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str]] = []  # (kind: text|open|close|anchor, raw, value)

    def add(self, kind: str, raw: str, value: str = "") -> None:
        self.items.append((kind, raw, value))

    def finish(self) -> list[str | _Segment]:
        items, self.items = self.items, []
        plain = "".join(value for kind, _, value in items if kind == "text")
        if not plain.strip():
            return ["".join(raw for _, raw, _ in items)] if items else []
        spans = [m.span() for m in _WORD.finditer(plain)]
        starts = [s for s, _ in spans]
        spelling = {value: raw for kind, raw, value in items if kind == "text" and raw.startswith("&") and value}
        roots: list[_Element] = []
        stack: list[tuple[_Element, int]] = []  # open elements and the text offset where each began
        offset = 0

        def attach(element: _Element) -> None:
            (stack[-1][0].children if stack else roots).append(element)

        for kind, raw, value in items:
            if kind == "text":
                offset += len(value)
            elif kind == "open":
                element = _Element(raw, "")
                attach(element)
                stack.append((element, offset))
            elif kind == "close" and stack:
                element, begin = stack.pop()
                element.close_raw = raw
                covered = [i for i, (s, e) in enumerate(spans) if s < offset and e > begin]
                element.first = covered[0] if covered else bisect_left(starts, begin)
                element.end = covered[-1] + 1 if covered else element.first
            else:  # a void inline tag, or a close tag whose open tag is in another segment: an anchor
                at = bisect_left(starts, offset)
                attach(_Element(raw, "", at, at, glued=kind == "close"))
        while stack:  # open tags whose close tag is in another segment: anchors, kept in order
            element, begin = stack.pop()
            at = bisect_left(starts, begin)
            element.first = element.end = at
            for child in element.children:  # its children stay where they were, after it
                attach(child)
            element.children = []
        _sort(roots)
        lead = plain[: len(plain) - len(plain.lstrip())]
        trail = plain[len(plain.rstrip()) :]
        return [_Segment(lead, trail, [plain[s:e] for s, e in spans], roots, spelling)]


def _sort(elements: list[_Element]) -> None:
    elements.sort(key=lambda e: (e.first, e.end))
    for element in elements:
        _sort(element.children)


class Document:
    """A parsed HTML document: ``texts`` are what to translate, ``render`` puts the translations back."""

    def __init__(self, parts: list[str | _Segment]) -> None:
        self.parts = parts
        self.segments = [part for part in parts if isinstance(part, _Segment)]

    @property
    def texts(self) -> list[str]:
        return [segment.text for segment in self.segments]

    @property
    def with_markup(self) -> list[bool]:
        """Per text: whether inline tags have to be placed (only those need the word alignment)."""
        return [bool(segment.roots) for segment in self.segments]

    def render(self, translations: list[Translated]) -> str:
        if len(translations) != len(self.segments):
            raise ValueError(f"{len(self.segments)} segments but {len(translations)} translations")
        done = iter(translations)
        return "".join(part if isinstance(part, str) else _render(part, next(done)) for part in self.parts)


def parse(source: str) -> Document:
    """Cut an HTML document (or fragment) into kept raw parts and segments to translate."""
    parts: list[str | _Segment] = []
    builder = _SegmentBuilder()
    open_tags: list[tuple[str, bool]] = []  # (tag, untranslatable) of the elements open around a token

    def keep(raw: str) -> None:
        parts.extend(builder.finish())
        parts.append(raw)

    for kind, tag, attrs, raw in _Tokens(source).raw_tokens():
        inside_untranslated = any(skip for _, skip in open_tags)
        if kind == "start" and tag not in VOID:
            open_tags.append((tag, inside_untranslated or _untranslatable(tag, attrs)))
        elif kind == "end" and any(t == tag for t, _ in open_tags):
            while open_tags.pop()[0] != tag:
                pass
        if inside_untranslated or kind == "other":
            keep(raw)
        elif kind in ("text", "entity"):
            builder.add("text", raw, html.unescape(raw) if kind == "entity" else raw)
        elif tag not in INLINE or _untranslatable(tag, attrs):
            keep(raw)
        elif kind == "start" and tag not in VOID:
            builder.add("open", raw)
        elif kind == "end" and tag not in VOID:
            builder.add("close", raw)
        else:  # <img>, <wbr>, or a stray end tag of a void element
            builder.add("anchor", raw)
    parts.extend(builder.finish())
    return Document(parts)


def _escape(text: str, spelling: dict[str, str]) -> str:
    return "".join(spelling.get(ch) or html.escape(ch, quote=False) for ch in text)


def _place_monotone(elements: list[_Element], n_source: int, n_target: int) -> None:
    """Source word positions scaled to the target's length: order and nesting kept, whatever the alignment."""
    for element in elements:
        element.start = round(element.first * n_target / n_source)
        element.stop = round(element.end * n_target / n_source)
        _place_monotone(element.children, n_source, n_target)


def _place_by_alignment(segment: _Segment, alignment: list[tuple[int, int]] | None, n_target: int) -> bool:
    """Each element around the target words aligned to its source words (hull with its children's places);
    False when there is no usable alignment or the places would cross (then _place_monotone decides)."""
    n_source = len(segment.words)
    if not alignment or any(not (0 <= s < n_source and 0 <= t < n_target) for s, t in alignment):
        return False
    targets: dict[int, list[int]] = {}
    for s, t in alignment:
        targets.setdefault(s, []).append(t)

    def place(element: _Element) -> None:
        for child in element.children:
            place(child)
        aligned = [t for s in range(element.first, element.end) for t in targets.get(s, [])]
        if aligned:
            element.start, element.stop = min(aligned), max(aligned) + 1
        else:  # around no word, or its words were dropped: where its position scales to
            element.start = element.stop = round(element.first * n_target / n_source)
        for child in element.children:
            element.start, element.stop = min(element.start, child.start), max(element.stop, child.stop)

    for root in segment.roots:
        place(root)
    return _disjoint(segment.roots)


def _disjoint(elements: list[_Element]) -> bool:
    ordered = sorted(elements, key=lambda e: (e.start, e.stop))
    return all(a.stop <= b.start for a, b in itertools.pairwise(ordered)) and all(
        _disjoint(e.children) for e in elements
    )


def _render(segment: _Segment, translated: Translated) -> str:
    found = list(_WORD.finditer(translated.text))
    words = [m.group() for m in found]
    gaps = [""] + [translated.text[a.end() : b.start()] for a, b in itertools.pairwise(found)]
    if not _place_by_alignment(segment, translated.alignment, len(words)):
        _place_monotone(segment.roots, len(segment.words), len(words))
    out = [_escape(segment.lead, segment.spelling)]
    gap_done = [False] * (len(words) + 1)

    def gap(k: int) -> None:  # the whitespace before target word k, once
        if 0 < k < len(words) and not gap_done[k]:
            out.append(_escape(gaps[k], segment.spelling))
            gap_done[k] = True

    def emit(lo: int, hi: int, children: list[_Element]) -> None:
        pos = lo
        for child in sorted(children, key=lambda e: (e.start, e.stop)):
            for k in range(pos, child.start):
                gap(k)
                out.append(_escape(words[k], segment.spelling))
            if not child.glued:
                gap(child.start)
            out.append(child.open_raw)
            emit(child.start, child.stop, child.children)
            out.append(child.close_raw)
            pos = max(pos, child.stop)
        for k in range(pos, hi):
            gap(k)
            out.append(_escape(words[k], segment.spelling))

    emit(0, len(words), segment.roots)
    out.append(_escape(segment.trail, segment.spelling))
    return "".join(out)
