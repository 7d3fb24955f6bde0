"""The model directory, the unit that flows from training to export to serving (no torch needed).

<dir>/model.json            config, languages, file names, training and evaluation metadata
<dir>/spm.model             SentencePiece model (joint vocabulary)
<dir>/weights.safetensors   torch weights (fp32 or fp16; loaders upcast)
<dir>/onnx/                 written by mt-export
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config import ModelConfig
from model.decoding import PAPER, DecodingOptions

MODEL_JSON = "model.json"
FORMAT_VERSION = 1


class ModelDirError(ValueError):
    """A model directory that is missing, incomplete or unreadable; the message names the file."""


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    config: ModelConfig
    source_lang: str
    target_lang: str
    tokenizer_file: Path
    weights_file: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    # The model's decoding defaults (model.json "decoding", e.g. tuned on val by scripts/tune_decoding.py);
    # the paper's where absent. Requests that leave beam_size/length_penalty/patience unset get these.
    decoding: DecodingOptions = PAPER
    # model.json's "tokenizer" when it is not one joint spm file: {"type": "marian", "source", "target", "vocab"}
    tokenizer_spec: dict[str, str] | None = None

    @property
    def name(self) -> str:
        return self.path.name


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; model dirs are read by other users (servers)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_model_dir(path: str | Path) -> ModelInfo:
    """Read and check a model directory; every missing piece is named in one error."""
    path = Path(path)
    meta_path = path / MODEL_JSON
    if not path.is_dir():
        raise ModelDirError(f"model directory not found: {path}")
    if not meta_path.is_file():
        raise ModelDirError(f"{meta_path} is missing: is {path} a model directory written by mt-train?")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{meta_path} is not valid JSON ({e}); re-create the model directory") from e
    problems = [f"{meta_path} has no {key!r}" for key in ("model", "source_lang", "target_lang") if key not in meta]
    if problems:
        raise ModelDirError("; ".join(problems))
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"{meta_path}: bad 'model' section: {e}") from e
    spec = meta.get("tokenizer", "spm.model")
    # A string names our one joint SentencePiece model; an imported Marian model names its pair and vocabulary.
    files = {"model": spec} if isinstance(spec, str) else {k: v for k, v in spec.items() if k != "type"}
    missing = [str(path / name) for name in files.values() if not (path / name).is_file()]
    if missing:
        raise ModelDirError(f"{', '.join(missing)} missing (the tokenizer files named in {meta_path})")
    tokenizer_file = path / (spec if isinstance(spec, str) else spec["source"])
    weights_file = path / meta.get("weights", "weights.safetensors")
    return ModelInfo(
        decoding=_decoding(meta.get("decoding") or {}, meta_path),
        tokenizer_spec=None if isinstance(spec, str) else dict(spec),
        path=path,
        config=config,
        source_lang=meta["source_lang"],
        target_lang=meta["target_lang"],
        tokenizer_file=tokenizer_file,
        weights_file=weights_file,
        metadata=meta,
    )


def _decoding(section: dict[str, Any], meta_path: Path) -> DecodingOptions:
    """The defaults a model dir declares: beam size, length penalty, max length offset, patience (other keys
    are notes)."""
    keys = ("beam_size", "length_penalty", "max_length_offset", "patience")
    try:
        return DecodingOptions(**{key: section[key] for key in keys if key in section})
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"{meta_path}: bad 'decoding' section: {e}; fix or remove it") from e


def write_model_json(path: str | Path, config: ModelConfig, source_lang: str, target_lang: str, **extra: Any) -> Path:
    """Write ``model.json`` (config, languages, file names, plus any metadata sections given)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "source_lang": source_lang,
        "target_lang": target_lang,
        "tokenizer": "spm.model",
        "weights": "weights.safetensors",
        "model": config.to_dict(),
        **extra,
    }
    out = Path(path) / MODEL_JSON
    atomic_write_text(out, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return out


def record_eval(path: str | Path, name: str, result: dict[str, Any]) -> None:
    """Set ``eval.<name>`` in a model dir's ``model.json`` to ``result``, keeping every other section."""
    meta_path = Path(path) / MODEL_JSON
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta.setdefault("eval", {})[name] = result
    atomic_write_text(meta_path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
