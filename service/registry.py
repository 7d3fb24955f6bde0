"""Loaded models by language pair: each with its engine and batcher; resolves a request's source/target."""

from __future__ import annotations

from dataclasses import dataclass

from service.batcher import Batcher
from service.engine import Engine


class UnknownPair(LookupError):
    """No loaded model translates the requested pair (404)."""


class AmbiguousPair(ValueError):
    """Several models fit; the request must say which (422)."""


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

    def resolve(self, source: str | None, target: str | None) -> ServedModel:
        fits = [m for (s, t), m in self.models.items() if source in (None, s) and target in (None, t)]
        if len(fits) == 1:
            return fits[0]
        asked = f"{source or '?'}→{target or '?'}"
        if not fits:
            raise UnknownPair(f"no model translates {asked}; available pairs: {describe(self.pairs)}")
        raise AmbiguousPair(
            f"several models fit {asked}; give both source and target (available pairs: {describe(self.pairs)})"
        )
