"""The training and evaluation loops the trainable runs (gradient clipping, channels_last), and the trainable's
epochs without Tune (SWA, checkpoints, restores), on a cached split of the sample data."""
import itertools
import logging
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from data_pipeline.cache import load_split
from data_pipeline.dataset import SegmentationDataset, make_loader
from data_pipeline.trial_data import DataSpec
from models.checkpoint import load_checkpoint
from models.factory import build_model
from models.weights import DEFAULT_NORMALIZATION
from models.inference import normalize, predict_batch
from models.losses import build_loss
from models.optim import schedule_steps
from models.training import TrainingDiverged, evaluate, place_model, train_epoch
from search.trainable import build_trial, plan_to_deadline, restore, run_epochs, save_trial_checkpoint


def test_training_lowers_the_loss_and_evaluation_reports_bounded_metrics(sample_root):
    torch.manual_seed(0)
    split = load_split(sample_root, "val.json", 64)
    num_classes = len(split.class_names)
    loader = make_loader(SegmentationDataset(split, "none", train=False), 8)
    model = build_model("Unet", "resnet18", num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = build_loss({"loss": "ce"})
    losses = [train_epoch(model, loader, loss_fn, optimizer, "cpu", DEFAULT_NORMALIZATION) for _ in range(6)]
    assert losses[-1] < 0.7 * losses[0], losses
    metrics = evaluate(model, loader, num_classes, "cpu", DEFAULT_NORMALIZATION)
    assert set(metrics) == {"val_miou", "val_image_miou", "val_pixel_acc", "val_loss", "val_class_iou"}
    ious = [v for v in metrics["val_class_iou"] if v is not None]
    assert len(metrics["val_class_iou"]) == num_classes and abs(sum(ious) / len(ious) - metrics["val_miou"]) < 1e-9
    assert 0 < metrics["val_image_miou"] <= 1
    assert 0 < metrics["val_miou"] <= 1 and 0 < metrics["val_pixel_acc"] <= 1 and metrics["val_loss"] > 0


# --- training options: gradient clipping, channels_last, SWA, restores (models.training, search.trainable) ---

class _HugeLoss(nn.Module):
    """Cross-entropy times a million: gradients far above any sensible clipping norm."""

    def __init__(self):
        super().__init__()
        self.ce = build_loss({"loss": "ce"})

    def forward(self, logits, masks):
        return self.ce(logits, masks) * 1e6


def _val_loader(sample_root, batch_size=8):
    split = load_split(sample_root, "val.json", 64)
    return make_loader(SegmentationDataset(split, "none", train=False), batch_size), len(split.class_names)


def _grad_norm(model) -> float:
    norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def test_grad_clipping_bounds_the_total_gradient_norm(sample_root):
    loader, num_classes = _val_loader(sample_root)
    norms = {}
    for clip in (None, 1.0):
        torch.manual_seed(0)
        model = build_model("FPN", "resnet18", num_classes)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the gradients stay after the step
        train_epoch(model, itertools.islice(loader, 1), _HugeLoss(), optimizer, "cpu", DEFAULT_NORMALIZATION, grad_clip=clip)
        norms[clip] = _grad_norm(model)
    assert norms[None] > 1e4, norms
    assert norms[1.0] == pytest.approx(1.0, rel=1e-3), norms


def test_channels_last_training_keeps_the_format_and_matches_contiguous_training(sample_root):
    loader, num_classes = _val_loader(sample_root, batch_size=4)
    losses, models = {}, {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = place_model(build_model("FPN", "resnet18", num_classes), "cpu", channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[channels_last] = [train_epoch(model, loader, build_loss({"loss": "ce"}), optimizer, "cpu",
                                             DEFAULT_NORMALIZATION, channels_last=channels_last) for _ in range(2)]
        models[channels_last] = model
    convs = [m.weight for m in models[True].modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)  # still, after AdamW steps
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def _norm_buffers(module: nn.Module) -> dict:
    return {name: b.clone() for name, b in module.named_buffers() if "running" in name}


def test_a_frozen_encoder_norm_keeps_its_statistics_while_its_scale_and_the_decoder_train(sample_root):
    loader, num_classes = _val_loader(sample_root)
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18", num_classes)
    encoder_stats, decoder_stats = _norm_buffers(model.encoder), _norm_buffers(model.decoder)
    encoder_scale = model.encoder.bn1.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_epoch(model, itertools.islice(loader, 2), build_loss({"loss": "ce"}), optimizer, "cpu",
                DEFAULT_NORMALIZATION, frozen_norm=model.encoder)
    assert all(torch.equal(b, encoder_stats[n]) for n, b in _norm_buffers(model.encoder).items())
    assert any(not torch.equal(b, decoder_stats[n]) for n, b in _norm_buffers(model.decoder).items())
    assert not torch.equal(model.encoder.bn1.weight, encoder_scale)  # the affine part is not frozen
    assert model.decoder.training  # the rest of the model trains as usual


def test_a_trial_with_a_frozen_encoder_norm_keeps_it_through_swa(sample_root):
    config = {**DataSpec(root=str(sample_root)).to_config(), **SWA_CONFIG, "decoder": "Unet", "encoder_norm": "frozen"}
    trial = build_trial(config)
    encoder_stats, decoder_stats = _norm_buffers(trial.model.encoder), _norm_buffers(trial.model.decoder)
    run_epochs(trial, lambda metrics, directory: None)
    for model in (trial.model, trial.swa.module):  # SWA recomputes the average's statistics: not the encoder's
        assert all(torch.equal(b, encoder_stats[n]) for n, b in _norm_buffers(model.encoder).items())
        assert any(not torch.equal(b, decoder_stats[n]) for n, b in _norm_buffers(model.decoder).items())


SWA_CONFIG = {"max_epochs": 3, "seed": 0, "resize": 64, "decoder": "FPN", "backbone": "resnet18",
              "augmentation": "none", "batch_size": 8, "schedule": "poly", "warmup_epochs": 1, "swa_epochs": 2}


def _lr(trial) -> float:
    return trial.optimizer.param_groups[0]["lr"]


@pytest.fixture(scope="module")
def swa_run(sample_root, tmp_path_factory):
    """One 3-epoch trial with SWA over the last 2 epochs, run without Tune; after each epoch it records
    the trained weights, the lr and (epoch 2) a checkpoint of the averaged model."""
    work = tmp_path_factory.mktemp("swa")
    config = {**DataSpec(root=str(sample_root)).to_config(), **SWA_CONFIG}
    trial = build_trial(config)
    record = {"params": {}, "lr": {}, "reported": []}

    def report(metrics, directory):
        epoch = metrics["epoch"]
        record["reported"].append(metrics)
        record["params"][epoch] = {n: p.detach().clone() for n, p in trial.model.named_parameters()}
        record["lr"][epoch] = _lr(trial)
        if epoch == 2:
            record["swa_state"] = {k: v.clone() for k, v in trial.swa.module.state_dict().items()}
            save_trial_checkpoint(trial, trial.swa.module, {"val_miou": metrics["val_miou"]}, work / "epoch2")

    run_epochs(trial, report)
    return config, trial, record, work


def test_swa_weights_are_the_mean_of_the_last_epochs_weights(swa_run):
    _, trial, record, _ = swa_run
    assert int(trial.swa.n_averaged) == 2
    averaged = dict(trial.swa.module.named_parameters())
    for name, last in record["params"][3].items():
        expected = (record["params"][2][name] + last) / 2
        assert torch.allclose(averaged[name], expected, atol=1e-6), name
    assert [m["epoch"] for m in record["reported"]] == [1, 2, 3]


def test_swa_batchnorm_statistics_are_recomputed_for_the_averaged_weights(swa_run):
    _, trial, _, _ = swa_run
    first_bn = next(m for m in trial.swa.module.modules() if isinstance(m, nn.BatchNorm2d))
    batch_means = []
    hook = first_bn.register_forward_pre_hook(lambda _, args: batch_means.append(args[0].float().mean((0, 2, 3))))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=trial.amp, enabled=trial.amp is not None):
            trial.swa.module.eval()
            for images, _ in trial.train_loader:  # equal batches: the mean of batch means is order-free
                trial.swa.module(normalize(images, DEFAULT_NORMALIZATION))
    finally:
        hook.remove()
    assert torch.allclose(first_bn.running_mean, torch.stack(batch_means).mean(0), atol=1e-5)
    trained_bn = next(m for m in trial.model.modules() if isinstance(m, nn.BatchNorm2d))
    assert not torch.allclose(first_bn.running_mean, trained_bn.running_mean, atol=1e-3)


def test_a_swa_checkpoint_is_a_plain_state_dict_for_a_fresh_model(swa_run):
    _, _, record, work = swa_run
    model, meta = load_checkpoint(work / "epoch2")  # strict load into build_model(...)
    assert meta["averaged_epochs"] == 1 and meta["epoch"] == 2
    state = model.state_dict()
    assert state.keys() == record["swa_state"].keys()
    assert all(torch.equal(state[k], v) for k, v in record["swa_state"].items())


def test_a_restored_trial_continues_the_schedule_and_the_average(swa_run):
    config, _, record, work = swa_run
    trial = build_trial(config)
    restore(trial, work / "epoch2")
    assert trial.epoch == 2
    assert _lr(trial) == pytest.approx(record["lr"][2])
    trained = dict(trial.model.named_parameters())
    assert all(torch.equal(trained[n], p) for n, p in record["params"][2].items())  # not the averaged ones
    assert int(trial.swa.n_averaged) == 1
    lrs = {}
    run_epochs(trial, lambda metrics, _: lrs.setdefault(metrics["epoch"], _lr(trial)))
    assert lrs == pytest.approx({3: record["lr"][3]})
    assert int(trial.swa.n_averaged) == 2


def test_a_cpu_trial_asked_for_amp_trains_in_float32_and_says_so(sample_root, caplog):
    config = {**DataSpec(root=str(sample_root)).to_config(), **SWA_CONFIG, "amp": "fp16", "swa_epochs": 0}
    with caplog.at_level(logging.WARNING, logger="search.trainable"):
        trial = build_trial(config, device=torch.device("cpu"))
    assert trial.amp is None and not trial.scaler.is_enabled() and trial.swa is None
    assert [r.getMessage() for r in caplog.records] == ["amp: fp16 runs on CUDA devices only; training in float32"]


def test_a_trial_ranked_by_val_loss_checkpoints_when_the_loss_falls(sample_root):
    from search.trainable import build_trial, run_epochs

    config = {"data_root": str(sample_root), "train_ann": "val.json", "val_ann": "val.json", "resize": 64,
              "batch_size": 4, "max_epochs": 3, "metric": "val_loss", "augmentation": "none", "lr": 3e-3}
    trial = build_trial(config)
    reports = []
    run_epochs(trial, lambda metrics, directory: reports.append((metrics, directory is not None)))
    losses = [m["val_loss"] for m, _ in reports]
    best = [min(losses[:i + 1]) for i in range(len(losses))]
    assert [m["best_val_loss"] for m, _ in reports] == best
    assert [saved for _, saved in reports] == [True] + [losses[i] < best[i - 1] for i in range(1, len(losses))]
    assert all(m["best_val_miou"] == max(r["val_miou"] for r, _ in reports[:i + 1]) for i, (m, _) in enumerate(reports))


def test_a_trial_is_scored_on_val_label_maps_of_the_eval_size_not_of_its_input_size(sample_root):
    config = {"data_root": str(sample_root), "train_ann": "val.json", "val_ann": "val.json", "resize": 32,
              "batch_size": 4, "max_epochs": 1, "augmentation": "none", "lr": 3e-3, "eval_size": 64}
    trial = build_trial(config)
    images, masks = next(iter(trial.val_loader))
    assert tuple(images.shape[1:3]) == (32, 32) and tuple(masks.shape[1:]) == (64, 64)
    reports = []
    run_epochs(trial, lambda metrics, directory: reports.append(metrics))
    # The same model's probabilities at 64 px against the 64 px truth, counted here with numpy.
    inputs = load_split(sample_root, "val.json", 32).images
    truth = load_split(sample_root, "val.json", 64).masks.astype(np.int64)
    probs = predict_batch(trial.model, torch.from_numpy(np.array(inputs)), (64, 64),
                          normalization=trial.normalization, amp=trial.amp)
    n = trial.num_classes
    conf = np.bincount(truth.ravel() * n + probs.argmax(1).numpy().ravel(), minlength=n * n).reshape(n, n)
    union = conf.sum(0) + conf.sum(1) - np.diag(conf)
    assert reports[0]["val_miou"] == pytest.approx(np.mean(np.diag(conf)[union > 0] / union[union > 0]))


def test_a_trial_that_keeps_its_last_checkpoint_saves_every_epoch_and_restores_its_best(sample_root, tmp_path):
    import shutil

    config = {"data_root": str(sample_root), "train_ann": "val.json", "val_ann": "val.json", "resize": 64,
              "batch_size": 4, "max_epochs": 3, "augmentation": "none", "lr": 3e-3, "checkpoint": "last"}
    trial = build_trial(config)
    reports = []

    def report(metrics, directory):
        reports.append(metrics)
        assert directory is not None  # every epoch, improved or not
        shutil.copytree(directory, tmp_path / "last", dirs_exist_ok=True)

    run_epochs(trial, report)
    again = build_trial(config)
    restore(again, tmp_path / "last")
    assert again.epoch == 3 and again.best == max(m["val_miou"] for m in reports)


def test_a_trial_holds_its_best_checkpoint_in_memory_and_hands_it_over_at_the_rungs_and_its_end(sample_root, tmp_path):
    import shutil

    config = {"data_root": str(sample_root), "train_ann": "val.json", "val_ann": "val.json", "resize": 64,
              "batch_size": 4, "max_epochs": 4, "augmentation": "none", "lr": 3e-3,
              "rungs": [2], "checkpoint_interval_s": 3600.0}
    trial = build_trial(config)
    scores, weights, written = [], {}, {}

    def report(metrics, directory):
        epoch = metrics["epoch"]
        scores.append(metrics["val_miou"])
        weights[epoch] = {k: v.clone() for k, v in trial.model.state_dict().items()}
        if directory is not None:
            written[epoch] = shutil.copytree(directory, tmp_path / f"epoch{epoch}")

    run_epochs(trial, report)
    assert 2 in written and set(written) <= {2, 4}  # the rung, and the end if it improved after the rung
    for epoch, directory in written.items():
        best = max(range(epoch), key=lambda i: (scores[i], -i)) + 1  # the first epoch with the best score so far
        model, meta = load_checkpoint(directory)
        assert meta["epoch"] == best and meta["metrics"]["val_miou"] == scores[best - 1]
        assert all(torch.equal(v, weights[best][k]) for k, v in model.state_dict().items())  # not later weights
    last = max(written)
    again = build_trial(config)
    restore(again, written[last])
    assert again.epoch == load_checkpoint(written[last])[1]["epoch"] and again.best == max(scores[:last])


class _Stop(Exception):
    pass


def test_a_trial_whose_epochs_do_not_fit_before_its_deadline_ends_early_with_its_lr_annealed(sample_root):
    config = {**DataSpec(root=str(sample_root)).to_config(), **SWA_CONFIG, "max_epochs": 20, "swa_epochs": 0,
              "schedule": "cosine", "warmup_epochs": 0, "lr": 1e-3}
    trial = build_trial(config)

    def stop_after_two(metrics, _):
        if metrics["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        run_epochs(trial, stop_after_two)
    reached = _lr(trial)
    trial.deadline, trial.epoch_times = 1000.0, [10.0, 10.0]
    plan_to_deadline(trial, now=1000.0 - 35.0)  # 35 s left at 1.1 x 10 s an epoch: 3 more epochs
    assert trial.last_epoch == 5
    trial.deadline = None  # the rest runs as planned
    seen = []
    run_epochs(trial, lambda metrics, _: seen.append((metrics["epoch"], metrics["planned_epochs"], _lr(trial))))
    assert [(epoch, planned) for epoch, planned, _ in seen] == [(3, 5), (4, 5), (5, 5)]
    lrs = [reached] + [lr for _, _, lr in seen]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    plan_to_deadline(trial)  # no deadline: nothing planned
    assert trial.last_epoch == 5


def test_the_report_of_an_epoch_that_ends_the_plan_says_so(sample_root):
    # The deadline passes during the first epoch: the trial ends with it, and its one report must say
    # that it planned to (not the 20 epochs planned before), or its end reads as a cut by Tune.
    config = {**DataSpec(root=str(sample_root)).to_config(), **SWA_CONFIG, "max_epochs": 20, "swa_epochs": 0,
              "schedule": "cosine", "warmup_epochs": 0, "lr": 1e-3}
    trial = build_trial(config)
    trial.deadline = time.time()
    seen = []
    run_epochs(trial, lambda metrics, directory: seen.append((metrics["epoch"], metrics["planned_epochs"],
                                                             directory is not None)))
    assert seen == [(1, 1, True)]  # and its checkpoint is written with the last planned epoch


def test_a_plan_made_on_slow_epochs_is_extended_when_they_get_faster_without_an_lr_jump(sample_root):
    config = {**DataSpec(root=str(sample_root)).to_config(), **SWA_CONFIG, "max_epochs": 20, "swa_epochs": 0,
              "schedule": "cosine", "warmup_epochs": 0, "lr": 1e-3}
    trial = build_trial(config)
    steps = len(trial.train_loader)
    trial.epoch, trial.deadline = 2, 1000.0
    for _ in range(2 * steps):
        trial.optimizer.step()
        trial.scheduler.step()
    trial.epoch_times = [40.0, 20.0]  # the first epoch also built the trial
    plan_to_deadline(trial, now=1000.0 - 100.0)  # 100 s left at 1.1 x 20 s: 4 more epochs
    assert trial.last_epoch == 6
    before = _lr(trial)
    trial.epoch_times += [5.0, 5.0]  # faster now: the mean of the last three is 10 s
    plan_to_deadline(trial, now=1000.0 - 100.0)  # 9 more epochs fit
    assert trial.last_epoch == 11 and _lr(trial) == pytest.approx(before)
    assert schedule_steps(trial.scheduler) == trial.scheduler.last_epoch + 9 * steps
    trial.epoch_times += [1.0, 1.0, 1.0]
    plan_to_deadline(trial, now=1000.0 - 100.0)
    assert trial.last_epoch == 20  # never past max_epochs


def test_an_epoch_whose_weights_become_nan_fails_the_trial_with_what_to_change(sample_root):
    loader, num_classes = _val_loader(sample_root)
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18", num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=float("inf"))
    with pytest.raises(TrainingDiverged, match="weights are no longer finite.*lower lr"):
        train_epoch(model, itertools.islice(loader, 1), build_loss({"loss": "ce"}), optimizer, "cpu",
                    DEFAULT_NORMALIZATION)
