"""Labelling new images with a finished search: its saved ensemble (ensemble.json) or one trial.

Each member sees the image resized to its own input size, as in training, and its logits are resized
to the image's own size before the softmax; the members' weighted probabilities are labelled by
models.ensemble.combine with the ensemble's open-set rejection and class filter, exactly as the
submission was.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from atomic_file import write_atomically
from data_pipeline.inspect import palette
from errors import UserError
from models.checkpoint import load_checkpoint
from models.ensemble import Decision, combine, has_weight
from models.inference import predict_batch
from models.optim import inference_amp

from .ensemble_job import member_weight, saved_decision
from .experiment import read_trials

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
OVERLAY_ALPHA = 0.5  # the label colour's share of an overlay pixel that is not background


@dataclass
class Predictor:
    members: list[tuple[torch.nn.Module, dict, object]]  # (model, its model.json, weight)
    class_names: list[str]
    tta: str = "none"
    decision: Decision = Decision()  # rejection, class filter, class scales (models.ensemble.combine)

    @classmethod
    def from_ensemble(cls, summary_path: Path, device, tta: str | None = None) -> "Predictor":
        """The ensemble ensemble_select.py saved (its TTA mode unless tta is given)."""
        if not summary_path.is_file():
            raise UserError(f"{summary_path} does not exist: run ensemble_select.py first, or pass --trial ID")
        summary = json.loads(summary_path.read_text())
        members = [(*load_checkpoint(m["checkpoint"], device), member_weight(m["weight"]))
                   for m in summary["members"] if has_weight(member_weight(m["weight"]))]
        return cls(members, members[0][1]["class_names"], tta or summary.get("tta", "none"), saved_decision(summary))

    @classmethod
    def from_trial(cls, experiment: Path, trial_id: str, device, tta: str | None = None) -> "Predictor":
        """One trial's best checkpoint alone (an open-set trial with its own rejection threshold)."""
        trials = {t.trial_id: t for t in read_trials(experiment)}
        if trial_id not in trials:
            raise UserError(f"--trial {trial_id}: no such trial in {experiment}; trials: {', '.join(sorted(trials))}")
        if trials[trial_id].checkpoint is None:
            raise UserError(f"--trial {trial_id}: the trial kept no checkpoint (status {trials[trial_id].status})")
        model, meta = load_checkpoint(trials[trial_id].checkpoint, device)
        open_set = meta.get("open_set")
        reject = (open_set["threshold"], open_set["reject_label"]) if open_set and "threshold" in open_set else None
        return cls([(model, meta, 1.0)], meta["class_names"], tta or "none", Decision(reject))

    def labels(self, image: np.ndarray, device) -> np.ndarray:
        """uint8 [H, W] labels of an RGB uint8 [H, W, 3] image, at its own size."""
        terms = []
        for model, meta, weight in self.members:
            height, width = meta["input_size"]
            resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
            probs = predict_batch(model, torch.from_numpy(resized)[None], image.shape[:2], device, self.tta,
                                  meta["normalization"], inference_amp(device))
            terms.append((weight, probs))
        labels, _ = combine(terms, *self.decision)
        return labels[0].to(torch.uint8).cpu().numpy()


def image_files(inputs: list[Path]) -> list[Path]:
    """The images named, and those in the folders named (sorted, not recursive)."""
    files = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise UserError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def output_names(files: list[Path]) -> list[str]:
    """One output stem per image; two inputs with one name would overwrite each other's outputs."""
    stems = [f.stem for f in files]
    for stem in set(stems):
        clashing = [str(f) for f in files if f.stem == stem]
        if len(clashing) > 1:
            raise UserError(f"images {' and '.join(clashing[:2])} would write the same outputs {stem}.png; "
                            f"predict them into different --out folders")
    return stems


def overlay(image: np.ndarray, labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """The image with every non-background pixel tinted by its class colour (RGB uint8)."""
    tinted = (1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * colours[labels]
    return np.where((labels > 0)[..., None], tinted, image).astype(np.uint8)


def predict_files(predictor: Predictor, files: list[Path], out: Path, device, log=print) -> int:
    """Writes OUT/<stem>.png (the labels, one byte per pixel) and OUT/<stem>_overlay.jpg per image, and
    OUT/legend.json (label -> class name and overlay colour); returns the images labelled."""
    stems = output_names(files)
    colours = palette(len(predictor.class_names))
    out.mkdir(parents=True, exist_ok=True)
    for path, stem in zip(files, stems):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR_RGB)
        if image is None:
            raise UserError(f"cannot read image {path} (outputs of the images before it are in {out})")
        labels = predictor.labels(image, device)
        write_atomically(out / f"{stem}.png", _encode(".png", labels))
        write_atomically(out / f"{stem}_overlay.jpg", _encode(".jpg", cv2.cvtColor(overlay(image, labels, colours),
                                                                                 cv2.COLOR_RGB2BGR)))
        log(f"  {path} -> {out / stem}.png ({', '.join(_classes_found(labels, predictor.class_names)) or 'background'})")
    legend = {str(i): {"class": name, "rgb": colours[i].tolist()} for i, name in enumerate(predictor.class_names)}
    write_atomically(out / "legend.json", json.dumps(legend, indent=2))
    return len(files)


def _classes_found(labels: np.ndarray, class_names: list[str]) -> list[str]:
    return [class_names[c] for c in np.unique(labels) if 0 < c < len(class_names)]


def _encode(suffix: str, array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(suffix, array)
    assert ok
    return encoded.tobytes()
