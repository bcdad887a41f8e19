"""Trial checkpoints: a plain state_dict plus a JSON that says how to rebuild and run the model.

Layout of a checkpoint directory:
    model.pt    state_dict, loadable with torch.load(..., weights_only=True)
    model.json  decoder, backbone, num_classes, class_names, input_size, normalization, metrics, epoch,
                and for an open-set model `open_set`: unknown_label, rule, threshold, reject_label (models.open_set)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from atomic_file import atomic_path, write_atomically

from .factory import build_model

WEIGHTS_FILE = "model.pt"
META_FILE = "model.json"


def save_checkpoint(directory: str | Path, model: nn.Module | dict, meta: dict) -> None:
    """model.pt from a model or its state_dict, and model.json from meta."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = model.state_dict() if isinstance(model, nn.Module) else model
    state = {k: v.detach().cpu() for k, v in weights.items()}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        torch.save(state, tmp)
    write_atomically(directory / META_FILE, json.dumps(meta, indent=2))


def read_meta(directory: str | Path) -> dict:
    return json.loads((Path(directory) / META_FILE).read_text())


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuilds the model described by model.json (random init) and loads the saved weights."""
    meta = read_meta(directory)
    model = build_model(meta["decoder"], meta["backbone"], meta["num_classes"], encoder_weights=None,
                        unknown_label=(meta.get("open_set") or {}).get("unknown_label"))
    state = torch.load(Path(directory) / WEIGHTS_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), meta
