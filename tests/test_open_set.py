"""Open-set handling of UNKNOWN: the Entropic Open-Set and Objectosphere losses, the open-set head,
the threshold sweep, and open-set trials trained and evaluated on generated data."""
import json
import math

import numpy as np

import pytest
import torch
import torch.nn as nn

from data_pipeline.classes import ClassMap, unknown_label
from models.checkpoint import load_checkpoint, read_meta, save_checkpoint
from models.factory import DECODERS, build_model
from models.losses import build_loss
from labels import IGNORE
from models.metrics import confusion_matrix, mean_iou
from models.open_set import (SOFTMAX_THRESHOLDS, UNKNOWN_LOGIT, KnownClassHead, OpenSetLoss, Relabelled,
                             ThresholdSweep, UnknownScoring, entropic_open_set, known_class_head, known_targets,
                             open_set_loss)

U = 2  # the unknown label in these tests: labels 0, 1 known, 2 UNKNOWN, 3 known


def test_entropic_open_set_has_zero_gradient_for_a_uniform_prediction():
    logits = torch.full((1, 3, 1, 1), 0.7, requires_grad=True)
    entropic_open_set(logits).sum().backward()
    assert torch.allclose(logits.grad, torch.zeros_like(logits.grad), atol=1e-7)
    # and the same through the whole loss, on an UNKNOWN pixel of a four-class label space
    full = torch.tensor([2.0, 2.0, UNKNOWN_LOGIT, 2.0]).view(1, 4, 1, 1).requires_grad_()
    loss = OpenSetLoss(build_loss({"loss": "ce"}), U)(full, torch.tensor([[[U]]]))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(3), rel=1e-6)  # -1/3 * 3 * log(1/3)
    assert full.grad.abs().max() < 1e-7


def test_entropic_open_set_loss_matches_a_hand_computation():
    # two pixels: one known (label 3, which is known class 2 once UNKNOWN is removed), one UNKNOWN
    z = [[1.0, -0.5, 0.3], [0.2, 0.4, -1.0]]  # known-class logits of each pixel
    logits = torch.tensor([[z[0][0], z[1][0]], [z[0][1], z[1][1]], [UNKNOWN_LOGIT] * 2, [z[0][2], z[1][2]]])
    logits = logits.view(1, 4, 1, 2)
    target = torch.tensor([[[3, U]]])

    def log_softmax(row, c):
        return row[c] - math.log(sum(math.exp(v) for v in row))

    ce = -log_softmax(z[0], 2)
    eos = -sum(log_softmax(z[1], c) for c in range(3)) / 3
    loss = OpenSetLoss(build_loss({"loss": "ce"}), U)(logits, target)
    assert loss.item() == pytest.approx((ce + eos) / 2, rel=1e-6)
    # ignored pixels count nowhere; a batch of them gives 0 with a zero gradient
    with_ignored = OpenSetLoss(build_loss({"loss": "ce"}), U)(
        torch.cat([logits, logits], dim=3), torch.tensor([[[3, U, IGNORE, IGNORE]]]))
    assert with_ignored.item() == pytest.approx(loss.item(), rel=1e-6)
    nothing = logits.clone().requires_grad_()
    zero = OpenSetLoss(build_loss({"loss": "ce"}), U)(nothing, torch.full((1, 1, 2), IGNORE))
    zero.backward()
    assert zero.item() == 0 and not nothing.grad.any()


def test_objectosphere_term_matches_a_hand_computation():
    head = KnownClassHead(nn.Conv2d(2, 3, 1), unknown_label=U)
    head.track_magnitude = True
    features = torch.tensor([[3.0, 0.0], [4.0, 1.0]]).view(1, 2, 1, 2)  # magnitudes 5 and 1
    logits = head(features)
    target = torch.tensor([[[0, U]]])
    margin, weight = 8.0, 0.1
    plain = OpenSetLoss(build_loss({"loss": "ce"}), U)(logits, target)
    sphere = OpenSetLoss(build_loss({"loss": "ce"}), U, head, margin, weight)(logits, target)
    # known pixel: (8 - 5)^2 = 9; UNKNOWN pixel: 1^2 = 1; mean over the two labelled pixels
    assert (sphere - plain).item() == pytest.approx(weight * (9 + 1) / 2, rel=1e-5)


def test_known_targets_and_relabelling():
    target = torch.tensor([0, 1, U, 3, IGNORE])
    assert known_targets(target, U).tolist() == [0, 1, IGNORE, 2, IGNORE]
    seen = []

    class Spy(nn.Module):
        def forward(self, logits, target):
            seen.append(target.tolist())
            return logits.sum()

    Relabelled(Spy(), U, 0)(torch.zeros(1), target)
    Relabelled(Spy(), U, IGNORE)(torch.zeros(1), target)
    assert seen == [[0, 1, 0, 3, IGNORE], [0, 1, IGNORE, 3, IGNORE]]


@pytest.mark.parametrize("decoder", sorted(set(DECODERS.values()) - {"DPT"}))  # DPT takes timm encoders only
def test_open_set_models_train_with_every_decoder(decoder):
    torch.manual_seed(0)
    model = build_model(decoder, "resnet18", num_classes=5, unknown_label=U)
    target = torch.randint(0, 5, (2, 128, 128))
    target[:, :8] = IGNORE
    cfg = {"unknown": "open_set", "objectosphere_margin": 5.0}
    loss = open_set_loss("open_set", build_loss({"loss": "focal", "focal_gamma": 0.5}), U, model, cfg)
    model.train()
    logits = model(torch.randn(2, 3, 128, 128))
    assert logits.shape == (2, 5, 128, 128)
    assert (logits.softmax(1)[:, U] == 0).all()
    value = loss(logits, target)
    value.backward()
    assert torch.isfinite(value)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_open_set_checkpoints_round_trip(tmp_path):
    model = build_model("Unet", "resnet18", 4, unknown_label=1).eval()
    meta = {"decoder": "Unet", "backbone": "resnet18", "num_classes": 4,
            "open_set": {"unknown_label": 1, "rule": "softmax", "reject_label": 1, "threshold": 0.4}}
    save_checkpoint(tmp_path, model, meta)
    loaded, _ = load_checkpoint(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(model(x), loaded(x))
    assert isinstance(known_class_head(loaded), KnownClassHead)


def _brute_force_confusion(truth, labels, scores, threshold, reject, num_classes):
    predicted = torch.where(scores < threshold, torch.full_like(labels, reject), labels)
    return confusion_matrix(truth, predicted, num_classes)


def test_threshold_sweep_finds_the_known_optimum():
    # known pixels are right and confident (0.6..0.9); UNKNOWN ones are predicted as class 1 with
    # scores 0.30..0.45: rejecting below any threshold in (0.45, 0.6] is perfect, 0.46 is the lowest.
    generator = torch.Generator().manual_seed(0)
    truth = torch.tensor([0] * 40 + [1] * 30 + [3] * 20 + [U] * 25 + [IGNORE] * 5)
    labels = torch.where(truth == U, 1, truth)
    labels[-5:] = 0
    scores = torch.empty(len(truth)).uniform_(0.6, 0.9, generator=generator)
    scores[truth == U] = torch.empty(25).uniform_(0.30, 0.45, generator=generator)
    scores[90] = 0.45  # an UNKNOWN pixel on a threshold: `below 0.45` keeps it
    scores[-5:] = 0.01  # ignored pixels: never counted, however they score
    sweep = ThresholdSweep(SOFTMAX_THRESHOLDS, 4, U, U)
    sweep.add(truth[:60], labels[:60], scores[:60])  # in two batches
    sweep.add(truth[60:], labels[60:], scores[60:])
    best = sweep.best()
    assert sweep.thresholds[best].item() == pytest.approx(0.46)
    curve = sweep.curve()
    assert curve[best]["miou"] == 1.0 and curve[best]["unknown_rejected"] == 1.0 and curve[best]["known_rejected"] == 0
    assert curve[0]["unknown_rejected"] == 0 and curve[0]["miou"] < 1
    # every threshold's confusion matrix equals a direct count
    for index, threshold in enumerate(SOFTMAX_THRESHOLDS):
        expected = _brute_force_confusion(truth, labels, scores, threshold.item(), U, 4)
        assert torch.equal(sweep.confusions()[index], expected), threshold
        assert curve[index]["miou"] == pytest.approx(mean_iou(expected))


def test_threshold_sweep_rejects_as_background():
    truth = torch.tensor([0, 1, U, U])
    labels = torch.tensor([0, 1, 1, 3])
    scores = torch.tensor([0.9, 0.9, 0.2, 0.3])
    sweep = ThresholdSweep(SOFTMAX_THRESHOLDS, 4, U, 0)
    bins = sweep.add(truth, labels, scores)
    index = 40  # threshold 0.4
    assert sweep.labels_at(labels, bins, index).tolist() == [0, 1, 0, 0]
    assert sweep.rejected()[0][index] == 1.0 and sweep.rejected()[1][index] == 0


def test_unknown_label_and_scoring_of_a_trial():
    names = ("Background", "Paper", "UNKNOWN", "Glass")
    assert unknown_label(names, None) == 2
    assert unknown_label(names, ClassMap(unknown_names=("mystery",))) is None
    assert UnknownScoring.of_trial({"unknown": "keep"}, 2) == UnknownScoring(2)
    scoring = UnknownScoring.of_trial({"unknown": "open_set", "objectosphere_margin": 3.0, "reject_as": "background"}, 2)
    assert scoring == UnknownScoring(2, True, "magnitude", 0)
    assert UnknownScoring.of_trial({"unknown": "open_set"}, None) is None


def _clothing_is_unknown(sample_root, **params) -> dict:
    """A trial config on the sample data whose Clothing objects are the UNKNOWN class (label 10)."""
    from data_pipeline.trial_data import DataSpec

    data = DataSpec(str(sample_root), class_map=ClassMap(map={"Clothing": "unknown"}).to_dict())
    return {**data.to_config(), "decoder": "Unet", "backbone": "resnet18", "resize": 64, "batch_size": 8,
            "max_epochs": 2, "lr": 3e-3, "augmentation": "none", **params}


@pytest.mark.parametrize("margin, eval_size", [(None, None), (2.0, None), (2.0, 96)])
def test_an_open_set_trial_rejects_at_its_best_val_threshold(sample_root, tmp_path, margin, eval_size):
    from search.trainable import build_trial, run_epochs

    trial = build_trial(_clothing_is_unknown(sample_root, unknown="open_set", objectosphere_margin=margin,
                                             eval_size=eval_size))
    assert trial.unknown == UnknownScoring(10, True, "softmax" if margin is None else "magnitude", 10)
    reports = []

    def report(metrics, directory):
        reports.append(metrics)
        if directory:
            import shutil
            shutil.copytree(directory, tmp_path / "best", dirs_exist_ok=True)

    run_epochs(trial, report)
    for metrics in reports:
        assert metrics["val_miou"] >= metrics["val_miou_no_reject"]
        assert 0 <= metrics["val_unknown_rejected"] <= 1 and 0 <= metrics["val_known_rejected"] <= 1
    model, meta = load_checkpoint(tmp_path / "best")
    best = next(m for m in reports if m["epoch"] == meta["epoch"])
    rule = meta["open_set"]
    assert rule["threshold"] == best["val_reject_threshold"] and rule["reject_label"] == 10
    point = max(rule["curve"], key=lambda p: p["miou"])
    assert point["miou"] == pytest.approx(best["val_miou"]) and point["threshold"] == rule["threshold"]
    # the checkpoint, rejecting at its threshold, scores what the trial reported
    head = known_class_head(model)
    head.track_magnitude = True
    conf = torch.zeros(11, 11, dtype=torch.long)
    for images, masks in trial.val_loader:
        from models.inference import predict_batch
        from models.weights import DEFAULT_NORMALIZATION

        size = tuple(masks.shape[-2:])  # eval_size: the truth is larger than the model's input
        probs = predict_batch(model, images, size, normalization=DEFAULT_NORMALIZATION, amp=trial.amp)
        scores = probs.max(1).values if margin is None else torch.nn.functional.interpolate(
            head.magnitude[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        labels = torch.where(scores < rule["threshold"], 10, probs.argmax(1))
        conf += confusion_matrix(masks.long(), labels, 11)
    assert mean_iou(conf) == pytest.approx(best["val_miou"], abs=1e-6)


@pytest.mark.parametrize("treatment", ["keep", "background", "ignore"])
def test_closed_set_treatments_report_how_often_unknown_is_predicted(sample_root, treatment):
    from search.trainable import build_trial, run_epochs

    trial = build_trial(_clothing_is_unknown(sample_root, unknown=treatment, max_epochs=1))
    assert known_class_head(trial.model) is None and trial.unknown == UnknownScoring(10)
    reports = []
    run_epochs(trial, lambda metrics, _: reports.append(metrics))
    assert 0 <= reports[0]["val_unknown_rejected"] <= 1
    logits, target = torch.randn(1, 11, 2, 2), torch.tensor([[[10, 1], [10, 2]]])
    relabelled = {"keep": target, "background": torch.where(target == 10, 0, target),
                  "ignore": torch.where(target == 10, IGNORE, target)}[treatment]
    assert trial.loss_fn(logits, target).item() == pytest.approx(build_loss({"loss": "ce"})(logits, relabelled).item())


def test_a_treatment_without_an_unknown_class_is_a_clear_error(sample_root):
    from errors import UserError
    from search.trainable import build_trial
    from data_pipeline.trial_data import DataSpec

    with pytest.raises(UserError, match="unknown: open_set needs an UNKNOWN class"):
        build_trial({**DataSpec(str(sample_root)).to_config(), "resize": 64, "unknown": "open_set"})


POLICY_SPACE = """
experiment: {num_samples: 4, max_epochs: 1, scheduler: fifo, seed: 9, cpus_per_trial: 1}
data: {class_map: classes.yaml}
space:
  unknown: {choice: [keep, background, ignore, open_set]}
  decoder: Unet
  backbone: resnet18
  resize: 64
  batch_size: 8
  lr: 3.0e-3
"""


@pytest.fixture(scope="module")
def policy_search(sample_root, tmp_path_factory):
    """One real search over the four UNKNOWN treatments (seed 9: TPE's first four proposals cover them),
    on the sample data with Clothing as the UNKNOWN class."""
    from .conftest import run_cli

    work = tmp_path_factory.mktemp("open_set")
    (work / "classes.yaml").write_text("map: {Clothing: unknown}\n")
    (work / "space.yaml").write_text(POLICY_SPACE)
    result = run_cli("launch.py", "--space", work / "space.yaml", "--data", sample_root,
                     "--storage", work / "runs", "--name", "policies", "--no-wandb")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work, work / "runs" / "policies"


def test_each_unknown_treatment_runs_end_to_end_in_a_search(policy_search):
    from search.experiment import read_trials

    _, experiment = policy_search
    trials = read_trials(experiment)
    assert sorted(t.config["unknown"] for t in trials) == ["background", "ignore", "keep", "open_set"]
    for t in trials:
        metrics = read_meta(t.checkpoint)["metrics"]
        assert 0 <= metrics["val_miou"] <= 1 and 0 <= metrics["val_unknown_rejected"] <= 1, t.config["unknown"]
        assert ("val_reject_threshold" in metrics) == (t.config["unknown"] == "open_set")
        assert 0 <= metrics["val_known_rejected"] <= 1
    from search.experiment import leaderboard_rows

    assert sorted(row["unknown"] for row in leaderboard_rows(trials)) == ["background", "ignore", "keep", "open_set"]
    # the report (from a path relative to the working directory) shows each trial's UNKNOWN shares
    # and the open-set trial's curve
    import os

    from .conftest import ROOT, run_cli

    result = run_cli("-m", "search.report", os.path.relpath(experiment, ROOT))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((experiment / "report" / "report.json").read_text())
    assert set(report["unknown"]["trials"]) == {t.trial_id for t in trials}
    [open_set] = [t for t in trials if t.config["unknown"] == "open_set"]
    assert list(report["unknown"]["curves"]) == [open_set.trial_id]
    assert (experiment / "report" / "unknown.png").is_file() and "unknown" in report["slices"]


def test_an_open_set_ensemble_rejects_in_the_submission(policy_search, sample_root, tmp_path):
    from data_pipeline.submission import read_submission
    from search.experiment import read_trials

    from .conftest import run_cli

    work, _ = policy_search
    (work / "open_set.yaml").write_text(POLICY_SPACE.replace("{choice: [keep, background, ignore, open_set]}",
                                                             "open_set").replace("num_samples: 4", "num_samples: 1"))
    result = run_cli("launch.py", "--space", work / "open_set.yaml", "--data", sample_root,
                     "--storage", work / "runs", "--name", "open", "--no-wandb")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "submission.csv"
    result = run_cli("ensemble_select.py", "--experiment", work / "runs" / "open", "--topk", "1", "--out", out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Open-set rejection: top-class share below" in result.stdout
    summary = json.loads((tmp_path / "ensemble.json").read_text())
    rejection = summary["open_set"]
    assert rejection["unknown_label"] == 10 and rejection["reject_label"] == 10
    point = rejection["curve"][round(rejection["threshold"] * 100)]
    # the class filter is fitted after rejection, on its labels
    rejected_miou = summary["class_filter"]["val_miou_before"] if summary["class_filter"] else summary["val_miou"]
    assert point["threshold"] == rejection["threshold"] and point["miou"] == pytest.approx(rejected_miou)
    report = json.loads((work / "runs" / "open" / "report" / "report.json").read_text())
    assert report["unknown"]["curves"]["ensemble"]["threshold"] == rejection["threshold"]
    labels = np.concatenate([row for _, row in read_submission(out)])
    # the model itself never predicts UNKNOWN (its probability is 0): only rejection writes label 10, where a
    # test pixel's top-class share falls below the threshold chosen on val (on a test set there may be none)
    [trial] = read_trials(work / "runs" / "open")
    assert trial.config["unknown"] == "open_set" and labels.max() <= 10
    assert rejection["threshold"] > 0 or not (labels == 10).any()


def test_the_space_refuses_treatments_where_the_masks_lose_unknown(tmp_path):
    from errors import UserError
    from search.space import load_space

    body = "space:\n  unknown: {choice: [keep, open_set]}\n  objectosphere_margin: {choice: [null, 5.0], when: {unknown: open_set}}\n"
    assert [p.name for p in load_space(_space(tmp_path, body)).params][:2] == ["unknown", "objectosphere_margin"]
    with pytest.raises(UserError, match=r"space.unknown: open_set needs the UNKNOWN pixels kept as a class, but the "
                                        r"data settings make them ignore"):
        load_space(_space(tmp_path, "data: {unknown: ignore}\n" + body))
    with pytest.raises(UserError, match=r"space.unknown.choice: unknown value 'reject'"):
        load_space(_space(tmp_path, "space:\n  unknown: {choice: [keep, reject]}\n"))
    with pytest.raises(UserError, match=r"space.objectosphere_margin: expected a number > 0"):
        load_space(_space(tmp_path, "space:\n  objectosphere_margin: -1\n"))


def _space(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_launch_refuses_open_set_on_data_without_an_unknown_class(sample_root, tmp_path):
    from .conftest import run_cli

    result = run_cli("launch.py", "--dry-run", "--data", sample_root, "--storage", tmp_path / "runs",
                     "--space", _space(tmp_path, "space:\n  unknown: open_set\n  resize: 64\n"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: space.unknown: open_set needs an UNKNOWN class, but train.json has no category named unknown")
    assert not (tmp_path / "runs").exists()
