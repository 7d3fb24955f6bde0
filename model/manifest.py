"""Reading MODEL_DIR/onnx/manifest.json, and the one start-up check of a model dir before serving it (no torch).

``export.manifest`` writes the manifest; this side reads it: which variants exist, which one to load, and
whether the files are still the ones that were validated (sha256). A file's hash is taken once per process
and remembered by (path, size, mtime), so mt-serve's check before binding the port, the engine's load and
the client's local mode do not re-hash the same graphs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.model_dir import ModelDirError, ModelInfo, read_model_dir
from model.signature import VARIANTS
from model.tokenizer import Tokenizer, VocabTokenizer, load_tokenizer

MANIFEST = "manifest.json"
STATIC_SCALES = "static: calibrated at export"  # an int8 entry's activation_scales when batch-independent
AUTO_INT8_MAX_LOSS = 0.1  # val BLEU int8 may lose against fp32 for MT_VARIANT=auto to serve it on CPU
_verified: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> sha256


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of ``path``, hashed once per process for as long as its size and mtime stay the same."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        _verified[key] = sha256(path)
    return _verified[key]


def read_manifest(onnx_dir: Path) -> dict[str, Any]:
    return json.loads((onnx_dir / MANIFEST).read_text(encoding="utf-8"))


def changed_files(onnx_dir: Path, manifest: dict[str, Any], names: set[str] | None = None) -> list[str]:
    """Files listed in the manifest (or only ``names`` of them) that are missing or whose sha256 differs."""
    return [
        name
        for name, entry in manifest["files"].items()
        if (names is None or name in names)
        and (not (onnx_dir / name).is_file() or file_sha256(onnx_dir / name) != entry["sha256"])
    ]


def resolve_variant(manifest: dict, variant: str, device: str) -> str:
    """``auto`` → on CUDA fp16 when the export has it, unless its validation found it losing more than 0.5 BLEU
    against fp32 (not recommended with a measured BLEU): the decoder step's attention op
    (GroupQueryAttention) has CUDA kernels for float16 and bfloat16 only, so fp32 on CUDA runs that op on the
    CPU provider with the cache copied there and back every step; else fp32. On CPU int8 when the export's
    validation found it within ``AUTO_INT8_MAX_LOSS`` BLEU of fp32 (and its activation scales are static, so a
    translation does not depend on its batch), else fp32.

    int8 is about twice as fast on CPU at beam 4 but changes some translations (the bundled model: ~10% of
    sentences, BLEU −0.24 on val, −0.12 on test2016), so ``auto`` takes it only when the loss is within what
    the default path may lose; a model exported without ``--int8`` or without a validation set is served in
    fp32, the reference variant (identical to torch). ``MT_VARIANT=fp32`` keeps fp32 whatever the manifest.
    """
    variants = manifest.get("variants", {})
    if variant != "auto":
        return variant
    if device == "cuda":
        fp16 = variants.get("fp16")
        usable = fp16 is not None and (fp16.get("recommended") or fp16.get("bleu") is None)  # not measured: usable
        return "fp16" if usable else "fp32"
    int8, fp32 = variants.get("int8", {}), variants.get("fp32", {})
    validated = all(type(entry.get("bleu")) in (int, float) for entry in (int8, fp32))  # bool is no score
    if (
        validated
        and int8.get("recommended")
        and int8.get("activation_scales") == STATIC_SCALES
        and round(fp32["bleu"] - int8["bleu"], 6) <= AUTO_INT8_MAX_LOSS  # BLEU has 2 decimals; 40.35 - 40.25 is 0.1
    ):
        return "int8"
    return "fp32"


@dataclass(frozen=True)
class ModelCheck:
    """A model dir that passed :func:`check_model_dir`: what to load, and the tokenizer already loaded."""

    info: ModelInfo
    manifest: dict
    variant: str
    tokenizer: Tokenizer | VocabTokenizer


def check_model_dir(path: str | Path, variant: str = "auto", device: str = "cpu") -> ModelCheck:
    """Check everything needed to serve ``path`` before loading graphs; raises ModelDirError naming the file."""
    info = read_model_dir(path)
    try:
        tokenizer = load_tokenizer(info)
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelDirError(f"{info.tokenizer_file} is not a usable SentencePiece model ({e})") from e
    if tokenizer.vocab_size != info.config.vocab_size:
        raise ModelDirError(
            f"{info.tokenizer_file} has {tokenizer.vocab_size} pieces but {info.path / 'model.json'} says "
            f"vocab_size {info.config.vocab_size}: the directory mixes files from different runs"
        )
    onnx_dir = info.path / "onnx"
    manifest_path = onnx_dir / MANIFEST
    if not manifest_path.is_file():
        raise ModelDirError(
            f"{manifest_path} is missing: export the model first with `mt-export {info.path}` "
            "(`make serve` does this for you)"
        )
    try:
        manifest = read_manifest(onnx_dir)
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{manifest_path} is not valid JSON ({e}): re-run `mt-export --force {info.path}`") from e
    chosen = resolve_variant(manifest, variant, device)
    if chosen not in manifest.get("variants", {}):
        flag = "" if chosen == "fp32" else f" --{chosen}"
        raise ModelDirError(
            f"{manifest_path} has no {chosen!r} variant (it has {sorted(manifest.get('variants', {}))}): "
            f"re-run `mt-export --force{flag} {info.path}` or choose another MT_VARIANT"
        )
    broken = changed_files(onnx_dir, manifest, set(VARIANTS[chosen][:2]))
    if broken:
        raise ModelDirError(
            f"{', '.join(str(onnx_dir / name) for name in broken)}: missing or changed since export "
            f"(sha256 differs from {manifest_path}): re-run `mt-export --force {info.path}`"
        )
    return ModelCheck(info, manifest, chosen, tokenizer)
