"""Checks a new search makes before Ray starts, so that a mistake costs seconds, not a failed search:
the data (every annotation file the trials read and every image they list; the test images the
submission needs) and the pretrained weights its trials will load. Problems are UserErrors naming
the file; what is only worth a warning is returned for the CLI to print."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.classes import ClassMap, unknown_label
from data_pipeline.coco import CocoSegmentation
from data_pipeline.extra_data import task_labels
from data_pipeline.inspect import class_shares, class_statistics
from data_pipeline.pseudo_labels import pseudo_class_map
from data_pipeline.trial_data import DataSpec
from data_pipeline.validate import check_usable, format_warning, summarise, validate_dataset
from errors import UserError
from models.factory import cached_weights, input_normalization
from models.weights import hub_reachable

from .space import SearchSpec, possible_values, pretrained_encoders


@dataclass
class DataCheck:
    skip: list[str] = field(default_factory=list)  # file names to leave out (with skip_bad)
    extra_skip: list[list[str]] = field(default_factory=list)  # the same, per external dataset
    counts: list[str] = field(default_factory=list)  # "1003 train", "251 val", ...
    num_classes: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return " / ".join(self.counts) + " images"


def check_data(spec: SearchSpec, data_root: Path, skip_bad: bool) -> DataCheck:
    """Checks the annotation files the search trains and validates on (pseudo-labels included), every
    image they list, and the test images (about 1 s for 1000 images); with skip_bad, bad training
    images are left out (DataCheck.skip) instead of stopping."""
    if not data_root.is_dir():
        raise UserError(f"data root {data_root} does not exist or is not a folder")
    d, result = spec.data, DataCheck()
    files = {"train": d.train, "val": d.val} if d.split == "given" else {f"{d.folds}-fold": d.train_all}
    classes = {ann: _check_file(data_root, ann, spec.class_map, skip_bad, role, result) for role, ann in files.items()}
    _check_test_images(data_root, d.test, spec.class_map, result)
    (first, first_names), *others = classes.items()
    for ann, names in others:
        if names != first_names:
            raise UserError(f"{data_root / first} and {data_root / ann} have different classes: "
                            f"{first_names} vs {names}")
    _check_unknown_class(spec, first, first_names)
    for ann in d.pseudo_labels:  # in the search's classes (and Uncertain), or refused
        _check_file(data_root, ann, pseudo_class_map(first_names), skip_bad, "pseudo-labelled", result)
    for source in d.sources():  # external data: its classes, once mapped, must be the task's
        result.extra_skip.append([])
        names = _check_file(Path(source.root), source.annotations, source.classes(), skip_bad, "external", result,
                            shown_as=source.name, skipped=result.extra_skip[-1])
        task_labels(names, tuple(first_names), source.name)
    result.num_classes = len(first_names)
    return result


def _check_file(data_root: Path, ann: str, class_map, skip_bad: bool, role: str, result: DataCheck,
                shown_as: str | None = None, skipped: list[str] | None = None) -> tuple:
    """Validates one annotation file into result (messages name it shown_as, else ann; its images to
    leave out go to skipped, else result.skip); returns its class names."""
    report = validate_dataset(data_root, ann, class_map=class_map)
    report.ann_file = shown_as or report.ann_file
    bad = check_usable(report, skip_bad)
    if bad:
        result.warnings.append(format_warning(report))
    (result.skip if skipped is None else skipped).extend(bad)
    result.counts.append(f"{report.num_images - len(bad)} {role}")
    return report.class_names


def _check_test_images(data_root: Path, test_ann: str, class_map, result: DataCheck) -> None:
    """The test images must all be readable now: the submission needs a row for each of them."""
    if not (data_root / test_ann).is_file():
        result.warnings.append(f"warning: {data_root / test_ann} does not exist; ensemble_select.py will need it")
        return
    report = validate_dataset(data_root, test_ann, class_map=class_map, require_annotations=False)
    if report.problems():
        raise UserError(f"{test_ann} cannot be used (test images cannot be skipped: the submission needs "
                        f"every one): {summarise(report.problems())}")


def _check_unknown_class(spec: SearchSpec, ann: str, class_names) -> None:
    """A space whose trials may treat UNKNOWN their own way needs an UNKNOWN class in the data."""
    treatments = sorted(set(possible_values(list(spec.params), "unknown")) - {"keep"})
    if treatments and unknown_label(class_names, spec.class_map) is None:
        names = ", ".join((spec.class_map or ClassMap()).unknown_names)
        raise UserError(f"space.unknown: {treatments[0]} needs an UNKNOWN class, but {ann} has no category named "
                        f"{names} (its classes: {', '.join(class_names)}); name it with the class map's unknown.names")


def training_sources(data: DataSpec, data_root: Path) -> list[str]:
    """One line per source of training images (the task's own training file, then each external
    dataset): images, annotations and each class's share of the pixels, in the task's classes."""
    own = data.train if data.split == "given" else data.train_all
    sources = [(f"task data {data_root / own}", CocoSegmentation(data_root, own, data.classes(), data.skip))]
    sources += [(f"external {s.name}" + (f" (share {s.share:g})" if s.share is not None else ""),
                 CocoSegmentation(s.root, s.annotations, s.classes(), s.skip)) for s in data.sources()]
    return [f"{name}: {class_shares(class_statistics(coco))}" for name, coco in sources]


def check_weights_cached(spec: SearchSpec) -> None:
    """Every pretrained encoder the space can propose must be in the cache, or the hub reachable: a
    trial would otherwise fail on it (it never trains random weights instead)."""
    for backbone, weights in pretrained_encoders(spec):
        found, hint = cached_weights(backbone, weights)
        if not found and not hub_reachable():
            raise UserError(f"space: backbone {backbone} with encoder_weights {weights!r} {hint}")


def weights_report(spec: SearchSpec) -> list[str]:
    """One line per pretrained encoder the space can propose: its cached file and input normalisation,
    or what is missing and how to get it."""
    lines = []
    for backbone, weights in pretrained_encoders(spec):
        found, hint = cached_weights(backbone, weights)
        if found:
            norm = input_normalization(backbone, weights)
            lines.append(f"{backbone} {weights}: cached ({found}); input mean {norm['mean']}, std {norm['std']}")
        else:
            lines.append(f"{backbone} {weights}: MISSING, trials using it will fail: {hint}")
    return lines
