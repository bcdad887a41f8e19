"""The report's figures (matplotlib, PNG files, no display): each draws data that search.artifacts
computed and returns the file name it wrote in the report folder."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from labels import IGNORE  # noqa: E402


def _save(fig, directory: Path, name: str) -> str:
    """Writes the figure atomically (a reader never sees half a PNG) and closes it."""
    path = directory / name
    fig.tight_layout()
    fig.savefig(path.with_name(f".{path.name}"), dpi=110, format="png")
    plt.close(fig)
    path.with_name(f".{path.name}").replace(path)
    return name


MARKERS = {"stopped early": ("x", "stopped early by ASHA"), "cut by budget": ("|", "cut by the time budget")}


def learning_curves(curves: dict, metric: str, labels: dict[str, str], directory: Path) -> str:
    """Each trial's metric per epoch, named by its varying parameters; the end of a trial that ASHA
    stopped or the time budget cut is marked (and the marks explained in the title)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    marked = set()
    for trial_id, curve in curves.items():
        epochs, values = curve["epochs"], curve["values"]
        line, = ax.plot(epochs, values, marker=".", linewidth=1, label=labels.get(trial_id, trial_id))
        if curve["status"] in MARKERS and epochs:
            ax.plot(epochs[-1], values[-1], MARKERS[curve["status"]][0], color=line.get_color(), markersize=10)
            marked.add(curve["status"])
    marks = "; ".join(f"{MARKERS[s][0]}: {MARKERS[s][1]}" for s in sorted(marked))
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch" + (f" ({marks})" if marks else ""))
    if len(curves) <= 12:
        ax.legend(fontsize=7, ncol=1 if len(curves) <= 6 else 2)
    return _save(fig, directory, "curves.png")


def progress(points: dict, metric: str, directory: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.step(points["seconds"], points["best"], where="post")
    ax.set(xlabel="seconds since the first report", ylabel=f"best {metric} so far", title="Search progress")
    return _save(fig, directory, "progress.png")


def importances(scores: dict[str, float], trials: int, few: int, directory: Path) -> str | None:
    if not scores:
        return None
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(scores) + 1.2))
    names = list(scores)[::-1]
    ax.barh(names, [scores[n] for n in names])
    caveat = f"\nfrom {trials} trials: a rough ranking (fewer than {few})" if trials < few else f" ({trials} trials)"
    ax.set(xlabel="importance (Optuna, sums to 1)", title="What mattered" + caveat)
    return _save(fig, directory, "importance.png")


def slices(slices: dict[str, dict], metric: str, directory: Path) -> str | None:
    """Each trial's best value against each searched parameter (search.artifacts.slice_groups): a column
    of points per value of a choice, a scatter (log axis where the range is wide) for a number."""
    if not slices:
        return None
    columns = min(3, len(slices))
    rows = math.ceil(len(slices) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(slices):]:
        ax.set_visible(False)
    for ax, (name, data) in zip(axes.flat, slices.items()):
        if data["continuous"]:
            ax.plot(data["x"], data["y"], "o", alpha=0.7)
            if data["log"]:
                ax.set_xscale("log")
            ax.tick_params(axis="x", labelsize=8)
        else:
            labels = sorted(data["groups"])
            for x, label in enumerate(labels):
                ax.plot([x] * len(data["groups"][label]), data["groups"][label], "o", alpha=0.7)
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_title(name, fontsize=9)
    for row in axes:
        row[0].set_ylabel(f"best {metric}")
    return _save(fig, directory, "slices.png")


def ensemble(summary: dict, directory: Path) -> list[str]:
    """Per-class IoU of the ensemble and each member; the ensemble's val confusion matrix."""
    names = list(summary["per_class_iou"])
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 3.5))
    width = 0.8 / (len(summary["members"]) + 1)
    series = [("ensemble", summary["per_class_iou"])] + [(m["trial_id"], m["per_class_iou"]) for m in summary["members"]]
    for k, (label, ious) in enumerate(series):
        ax.bar(np.arange(len(names)) + k * width, [ious[n] if ious[n] is not None else 0 for n in names], width,
               label=label)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, fontsize=8)
    ax.set(ylabel="val IoU", title="Per-class IoU: ensemble and members")
    ax.legend(fontsize=7)
    figures = [_save(fig, directory, "ensemble_classes.png")]
    if summary.get("confusion"):
        figures.append(_confusion(np.asarray(summary["confusion"], dtype=float), names, directory))
    return figures


def _confusion(conf: np.ndarray, names: list[str], directory: Path) -> str:
    share = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.5 * len(names) + 2, 0.5 * len(names) + 1.5))
    image = ax.imshow(share, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="Ensemble val confusion (row share)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, directory, "confusion.png")


def unknown(data: dict, directory: Path) -> str:
    """Left: each trial's shares of UNKNOWN and of known val pixels flagged as UNKNOWN, by treatment.
    Right: the open-set curves (share of UNKNOWN rejected against share of known rejected, one point
    per threshold) of the best open-set trials and of the ensemble, their chosen thresholds marked
    (search.artifacts.unknown_data)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for treatment, points in sorted(data["by_treatment"].items()):
        left.scatter([p[0] for p in points], [p[1] for p in points], alpha=0.8,
                     label=f"{treatment} (best val mIoU {max(p[2] for p in points):.3f})")
    left.set(xlabel="known val pixels flagged UNKNOWN", ylabel="UNKNOWN val pixels flagged UNKNOWN",
             title="UNKNOWN by treatment (best checkpoint of each trial)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    left.legend(fontsize=8)
    for name, rule in data["rules"]:
        points, chosen = rule["curve"], data["curves"][name]["chosen"]
        line, = right.plot([p["known_rejected"] for p in points], [p["unknown_rejected"] for p in points],
                           label=f"{name} (t={rule['threshold']:.3g})")
        right.plot(chosen["known_rejected"], chosen["unknown_rejected"], "o", color=line.get_color())
    right.set(xlabel="known val pixels rejected", ylabel="UNKNOWN val pixels rejected",
              title="Open-set curves (dot: threshold of the best val mIoU)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    if data["rules"]:
        right.legend(fontsize=7)
    else:
        right.set_visible(False)
    return _save(fig, directory, "unknown.png")


def worst_images(data: dict, directory: Path) -> str:
    """Image, ground truth, prediction and wrong pixels of each of the worst val images, named by file,
    in the class palette of the dataset inspector's grid, with a legend of the classes shown
    (search.artifacts.worst_images)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from data_pipeline.inspect import palette

    images, truth, predicted, names = data["images"], data["truth"], data["predicted"], data["names"]
    colours = ListedColormap(palette(len(names))[:len(names)] / 255)
    fig, axes = plt.subplots(len(data["worst"]), 4, figsize=(10, 2.8 * len(data["worst"]) + 0.8), squeeze=False)
    shown = set()
    for row, image in zip(axes, data["worst"]):
        i = image["index"]
        valid = truth[i] != IGNORE
        wrong = valid & (truth[i] != predicted[i])
        shown |= set(np.unique(truth[i][valid]).tolist()) | set(np.unique(predicted[i]).tolist())
        titles = [f"{image.get('file_name', f'val #{i}')}\nmIoU {image['miou']:.3f}", "ground truth", "ensemble",
                  "wrong pixels:\n" + "\n".join(image["confusions"][:2])]
        row[0].imshow(images[i])
        row[1].imshow(np.ma.masked_where(~valid, truth[i]), cmap=colours, vmin=0, vmax=len(names) - 1,
                      interpolation="nearest")
        row[2].imshow(predicted[i], cmap=colours, vmin=0, vmax=len(names) - 1, interpolation="nearest")
        row[3].imshow(wrong, cmap="Reds", vmin=0, vmax=1)
        for ax, title in zip(row, titles):
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    handles = [Patch(color=colours(c), label=names[c]) for c in sorted(shown) if c < len(names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (2.8 * len(data["worst"]) + 0.8), 1, 1))
    return _save(fig, directory, "worst_images.png")
