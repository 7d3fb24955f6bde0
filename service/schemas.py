"""Request and response bodies of the HTTP API (pinned in DESIGN.md), with the examples shown at /docs.

Static bounds live here; the ones that depend on settings (items per request, characters per text, the
largest beam) are checked by the route, which answers 413/422 naming the setting.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model.decoding import PAPER

MAX_BEAM = 16  # beam sizes above this are refused whatever MT_MAX_BEAM says
MAX_LENGTH = 1024  # the largest max_length accepted (a model may allow fewer: its max_positions - 1)
MAX_PATIENCE = 16.0  # waits for up to 16 x beam finished translations; the max length ends a sentence anyway
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_characters(value: str, where: str) -> str:
    """``value`` unless it holds a lone surrogate (JSON's ``"\\ud800"`` escape decodes to one): that is no
    character, cannot be encoded as UTF-8, and would fail deep in the tokenizer; 422 names where it is."""
    found = _SURROGATE.search(value)
    if found:
        raise ValueError(
            f"{where} holds a lone surrogate (U+{ord(found.group()):04X}) at character {found.start()}, which "
            "is not a character: send valid UTF-8, or a \\uD8xx escape followed by its \\uDCxx pair"
        )
    return value


class TranslateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"text": "Ein Mann fährt Fahrrad.", "source": "de", "target": "en"},
                {
                    "text": ["Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch."],
                    "beam_size": 5,
                    "n_best": 2,
                    "return_scores": True,
                    "return_attention": True,
                },
            ]
        },
    )

    text: str | list[str] = Field(description="one text, or a list of texts translated independently")
    source: str | None = Field(
        None, description='source language (a BCP-47 tag, or "auto" to detect it); optional when one model is loaded'
    )
    target: str | None = Field(None, description="target language; optional when one model is loaded")
    beam_size: int | None = Field(
        None,
        ge=1,
        le=MAX_BEAM,
        description=f"beam width; 1 is greedy decoding. Default: the model's (model.json decoding; the paper's "
        f"{PAPER.beam_size} unless tuned), raised to n_best if that is larger",
    )
    n_best: int = Field(
        PAPER.n_best, ge=1, le=MAX_BEAM, description="translations per text (alternatives after the first)"
    )
    length_penalty: float | None = Field(
        None,
        ge=0.0,
        le=5.0,
        description="GNMT α: score = log p / ((5 + |Y|) / 6) ** α. Default: the model's (model.json decoding; "
        f"the paper's {PAPER.length_penalty} unless tuned)",
    )
    patience: float | None = Field(
        None,
        gt=0.0,
        le=MAX_PATIENCE,
        description="stopping rule. Unset (default): exact, a sentence ends only when no live beam can still win. "
        "A number p: end a sentence once round(beam_size * p) translations have finished (CTranslate2's rule; "
        "fewer decoding steps, and it may miss a longer translation that scores higher)",
    )
    max_length: int | None = Field(
        None,
        ge=1,
        le=MAX_LENGTH,
        description=f"max target tokens per sentence; default source tokens + {PAPER.max_length_offset}",
    )
    return_scores: bool = Field(False, description="add each translation's score (log p / length penalty)")
    return_attention: bool = Field(False, description="add subword cross-attention and a word alignment")

    @field_validator("text", "source", "target")
    @classmethod
    def _characters(cls, value: str | list[str] | None, info) -> str | list[str] | None:
        if isinstance(value, list):
            return [check_characters(text, f"{info.field_name}[{i}]") for i, text in enumerate(value)]
        return value if value is None else check_characters(value, info.field_name)

    @model_validator(mode="after")
    def _check(self) -> TranslateRequest:
        if self.beam_size is not None and self.n_best > self.beam_size:
            raise ValueError(f"n_best ({self.n_best}) must not exceed beam_size ({self.beam_size}): raise beam_size")
        if isinstance(self.text, list) and not self.text:
            raise ValueError("text is an empty list: send at least one text")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


class Alternative(BaseModel):
    text: str
    score: float


class AttentionOut(BaseModel):
    source_tokens: list[str] = Field(description="source subword pieces (the source EOS is not shown)")
    target_tokens: list[str] = Field(description="target subword pieces of the best translation")
    weights: list[list[float]] = Field(
        description="one row per target token, one column per source token; each row sums to 1 "
        "(renormalised over the shown source tokens)"
    )
    alignment: list[Annotated[list[int], Field(min_length=2, max_length=2)]] = Field(
        description="[source word, target word] pairs: each target word's most attended source word"
    )


class Translation(BaseModel):
    text: str
    score: float | None = Field(None, description="present with return_scores")
    alternatives: list[Alternative] | None = Field(
        None, description="present with n_best > 1: the n-best after the first"
    )
    attention: AttentionOut | None = Field(None, description="present with return_attention")


class TranslateResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "multi30k-de-en", "translations": [{"text": "A man is riding a bicycle."}]}]
        }
    )

    model: str = Field(description="name of the model directory that translated")
    translations: list[Translation] = Field(description="one per input text, in input order")


class ModelOut(BaseModel):
    name: str
    source: str
    target: str
    variant: str = Field(description="the ONNX variant it runs (or will run once loaded)")
    device: str
    bleu: float | None = Field(None, description="validation BLEU recorded in model.json")
    bleu_signature: str | None = None
    parameters: int | None = None
    loaded: bool = Field(description="whether its sessions are in memory now (else it loads on first use)")
    status: Literal["loaded", "loading", "unloaded", "failed"] = Field(
        description="failed: its last load failed (the server log says why; retried after a while)"
    )


class ModelsResponse(BaseModel):
    models: list[ModelOut]


class Health(BaseModel):
    status: str
    detail: str | None = None


class ErrorBody(BaseModel):
    detail: str | list = Field(description="what went wrong and what to change")
    request_id: str | None = None
