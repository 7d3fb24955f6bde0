"""Save and load Transformer weights as safetensors (fp32 or fp16 on disk; always fp32 once loaded)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.model_dir import ModelDirError, ModelInfo, read_model_dir
from model.transformer import Transformer


def save_weights(model: Transformer, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Atomic write of the state dict (tied embeddings are one tensor, so nothing is stored twice)."""
    path = Path(path)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)  # readable by a server running as another user
    os.replace(tmp, path)


def load_weights(model: Transformer, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"weights file is missing: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelDirError(f"{path} is not a readable safetensors file ({e})") from e
    state = {k: v.float() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelDirError(
            f"{path} does not match the config in model.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, ModelInfo]:
    """Build the network from ``model.json`` and load its weights, in eval mode."""
    info = read_model_dir(model_dir)
    model = Transformer(info.config)
    load_weights(model, info.weights_file)
    return model.to(device).eval(), info
