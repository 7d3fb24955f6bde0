"""Loaded models by language pair: each with its engine and batcher; resolves a request's source/target.

Language codes are BCP-47 tags, compared after normalisation by ``langcodes`` ("DE", "de_DE", "deu" and
"ger" all read as "de"): a tag matches a model's language when both normalise to the same tag, or when
their language subtags are equal and one of them names no region or script ("de-DE" asks a "de" model,
"de" asks a "de-CH" one; "de-AT" does not ask a "de-CH" one).
"""

from __future__ import annotations

from dataclasses import dataclass

import langcodes

from service.batcher import Batcher
from service.engine import Engine


class UnknownPair(LookupError):
    """No loaded model translates the requested pair (404)."""


class AmbiguousPair(ValueError):
    """Several models fit; the request must say which (422)."""


def normalize(tag: str) -> str:
    """A language tag in its standard form ("DE" -> "de", "de_de" -> "de-DE", "deu" -> "de"); a tag that is
    not BCP-47 at all comes back stripped and lower-cased, so that it can still match a model's own code."""
    try:
        return langcodes.standardize_tag(tag.strip())
    except (ValueError, langcodes.tag_parser.LanguageTagError):
        return tag.strip().lower()


def _language(tag: str) -> str:
    return tag.split("-", 1)[0].lower()


def matches(asked: str | None, served: str) -> bool:
    """Whether a requested tag (None: any) asks for a model language ``served``."""
    if asked is None:
        return True
    asked, served = normalize(asked), normalize(served)
    if asked.lower() == served.lower():
        return True
    return _language(asked) == _language(served) and (asked.count("-") == 0 or served.count("-") == 0)


@dataclass
class ServedModel:
    engine: Engine
    batcher: Batcher

    @property
    def pair(self) -> tuple[str, str]:
        return self.engine.info.source_lang, self.engine.info.target_lang


def describe(pairs: list[tuple[str, str]]) -> str:
    return ", ".join(f"{s}→{t}" for s, t in pairs)


class Registry:
    def __init__(self, models: list[ServedModel]) -> None:
        self.models: dict[tuple[str, str], ServedModel] = {}
        for served in models:
            if served.pair in self.models:
                other = self.models[served.pair].engine.info.path
                raise ValueError(f"{served.engine.info.path} and {other} both translate {describe([served.pair])}")
            self.models[served.pair] = served

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(self.models)

    @property
    def sources(self) -> list[str]:
        """The source languages served, each once, in load order."""
        return list(dict.fromkeys(s for s, _ in self.models))

    def resolve(self, source: str | None, target: str | None) -> ServedModel:
        fits = [m for (s, t), m in self.models.items() if matches(source, s) and matches(target, t)]
        exact = [m for m in fits if _same(source, m.pair[0]) and _same(target, m.pair[1])]
        if len(exact) == 1:  # "de-CH" when both a "de" and a "de-CH" model are loaded
            return exact[0]
        if len(fits) == 1:
            return fits[0]
        asked = f"{source or '?'}→{target or '?'}"
        if not fits:
            raise UnknownPair(f"no model translates {asked}; available pairs: {describe(self.pairs)}")
        raise AmbiguousPair(
            f"several models fit {asked}; give both source and target (available pairs: {describe(self.pairs)})"
        )


def _same(asked: str | None, served: str) -> bool:
    return asked is None or normalize(asked).lower() == normalize(served).lower()
