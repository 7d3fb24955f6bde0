"""Writing MODEL_DIR/onnx/manifest.json: hashes, exporter and library versions, validation figures.

``model.manifest`` is the reading side (the service has no torch and imports only that).

The manifest is the record a server reads before trusting the graphs: which variants exist, their
sha256, and what validation measured for each (step parity, beam parity, BLEU, recommended or not).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from model.manifest import MANIFEST, sha256
from model.model_dir import atomic_write_text

FORMAT_VERSION = 1
LIBRARIES = ("torch", "onnx", "onnxscript", "onnxruntime", "numpy")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_entries(onnx_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {name: {"sha256": sha256(onnx_dir / name), "bytes": (onnx_dir / name).stat().st_size} for name in names}


def build_manifest(
    onnx_dir: Path,
    *,
    model_name: str,
    exporter: str,
    opset: int,
    variants: dict[str, dict[str, Any]],
    evaluation: dict[str, Any],
) -> dict[str, Any]:
    """``variants`` maps each variant to its files and figures; the hashes are taken here, from the files."""
    names = sorted({f for entry in variants.values() for f in entry["files"].values()})
    return {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exporter": {"name": exporter, "opset": opset, "versions": library_versions()},
        "files": file_entries(onnx_dir, names),
        "variants": variants,
        "evaluation": evaluation,
    }


def write_manifest(onnx_dir: Path, manifest: dict[str, Any]) -> Path:
    path = onnx_dir / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    path.chmod(0o644)  # the temporary file it was written as is private
    return path
