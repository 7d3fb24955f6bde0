"""Which language is a text in: offline identification with lingua, among the languages the models serve only.

A ``Detector`` is built for the source languages of the loaded models; lingua's models for those languages
load on the first detection (a fraction of a second each) and stay in memory. Languages lingua does not know
(a model's made-up code such as "src") can be served but never detected: with one source language served, it
is the answer whatever the text; otherwise a text that none of the known languages fits cannot be routed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import cache

from lingua import IsoCode639_1, IsoCode639_3, Language, LanguageDetector, LanguageDetectorBuilder

from service.registry import normalize

logger = logging.getLogger(__name__)


class UndetectableLanguage(ValueError):
    """The text's language cannot be told among the served source languages (400: give ``source``)."""


@dataclass(frozen=True)
class Detected:
    """A candidate language (the served code) and lingua's confidence in it, 0 to 1."""

    language: str
    confidence: float


def lingua_language(code: str) -> Language | None:
    """The lingua language of a BCP-47 tag's language subtag (two or three letters), None when lingua lacks it."""
    subtag = normalize(code).split("-", 1)[0].upper()
    try:
        if len(subtag) == 2:
            return Language.from_iso_code_639_1(getattr(IsoCode639_1, subtag))
        if len(subtag) == 3:
            return Language.from_iso_code_639_3(getattr(IsoCode639_3, subtag))
    except (AttributeError, ValueError):
        return None
    return None


class Detector:
    """Detects among ``languages`` (the served source codes, returned as given)."""

    def __init__(self, languages: list[str]) -> None:
        self.languages = list(dict.fromkeys(languages))
        self.known = {lang: found for lang in self.languages if (found := lingua_language(lang)) is not None}
        self._codes = {found: lang for lang, found in self.known.items()}
        self._detector: LanguageDetector | None = None
        self._lock = threading.Lock()

    def _lingua(self) -> LanguageDetector:
        with self._lock:  # detections run in worker threads; build lingua's detector once
            if self._detector is None:
                self._detector = LanguageDetectorBuilder.from_languages(*self.known.values()).build()
                logger.info("language detection among %s", ", ".join(self.known))
            return self._detector

    def candidates(self, text: str) -> list[Detected]:
        """Every served language lingua knows, most likely first (confidences sum to 1 when any is above 0)."""
        if not self.known or not text.strip():
            return []
        values = self._lingua().compute_language_confidence_values(text)
        return [Detected(self._codes[v.language], float(v.value)) for v in values]

    def detect(self, text: str) -> Detected:
        """The served source language of ``text``; UndetectableLanguage when it cannot be told."""
        found = self.candidates(text)
        if found and found[0].confidence > 0:
            return found[0]
        if len(self.languages) == 1:
            only = self.languages[0]
            return Detected(only, found[0].confidence if found else 0.0)
        unknown = [lang for lang in self.languages if lang not in self.known]
        why = "the text is empty" if not text.strip() else "no served language fits it"
        if unknown:
            why += f" (languages that cannot be detected: {', '.join(unknown)})"
        raise UndetectableLanguage(
            f"cannot detect the source language: {why}; give source as one of {', '.join(self.languages)}"
        )


@cache
def detector_for(sources: tuple[str, ...]) -> Detector:
    """One detector per set of served source languages (the registry does not change while serving)."""
    return Detector(list(sources))
