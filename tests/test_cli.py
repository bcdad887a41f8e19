"""The two CLIs end to end, as a user runs them: real Ray Tune, Optuna, ASHA, smp models, generated data."""
import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.coco import CocoSegmentation
from data_pipeline.submission import read_submission
from search.experiment import read_trials

from .conftest import ROOT, cache_unreadable_weights, run_cli
from .test_extra_data import CLASS_MAP as EXTERNAL_CLASS_MAP, make_external

TINY_PARAMS = ("decoder", "backbone", "loss", "focal_gamma", "augmentation", "lr")
TINY_SPACE = """
experiment: {num_samples: 6, max_epochs: 3, grace_period: 1, reduction_factor: 2, seed: 0, cpus_per_trial: 1}
first_trials:
  - {decoder: FPN, backbone: mobilenet_v2, loss: ce, augmentation: none, lr: 0.005}
space:
  decoder: {choice: [Unet, FPN]}
  backbone: {choice: [resnet18, mobilenet_v2]}
  loss: {choice: [ce, focal]}
  focal_gamma: {uniform: [0.5, 3.0], when: {loss: focal}}
  augmentation: {choice: [none, flip]}
  resize: 64
  lr: {loguniform: [1.0e-3, 1.0e-2]}
  batch_size: 8
"""


@pytest.fixture(scope="module")
def experiment(sample_root, tmp_path_factory):
    """One real search on the sample data, shared by the tests of this module."""
    work = tmp_path_factory.mktemp("search")
    (work / "space.yaml").write_text(TINY_SPACE)
    result = run_cli("launch.py", "--space", work / "space.yaml", "--data", sample_root,
                     "--storage", work / "runs", "--name", "e2e")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work / "runs" / "e2e", result


def _leaderboard(path):
    with open(path / "leaderboard.csv") as f:
        return list(csv.DictReader(f))


def test_search_writes_a_leaderboard_with_early_stopped_trials(experiment):
    path, result = experiment
    rows = _leaderboard(path)
    assert len(rows) == 6
    columns = list(rows[0])
    assert columns[:2] == ["experiment", "trial_id"] and {r["experiment"] for r in rows} == {"e2e"}
    assert [c for c in columns if c in TINY_PARAMS + ("resize", "batch_size")] == list(
        TINY_PARAMS[:4]) + ["augmentation", "resize", "lr", "batch_size"]  # every parameter the space sets
    assert {"best_val_miou", "best_epoch", "val_image_miou", "val_loss", "checkpoint", "space", "dataset",
            "started", "iou_Background"} <= set(columns)
    assert {r["batch_size"] for r in rows} == {"8"} and {r["space"] for r in rows} == {str(path.parent.parent / "space.yaml")}
    for r in rows:
        assert 1 <= int(r["best_epoch"]) <= int(r["epochs"]) and (Path(r["checkpoint"]) / "model.pt").is_file()
        lr = next(t.config["lr"] for t in read_trials(path) if t.trial_id == r["trial_id"])
        assert float(r["lr"]) == lr  # exact, not rounded
    statuses = [r["status"] for r in rows]
    assert "stopped early" in statuses and "finished" in statuses, statuses
    assert all(int(r["epochs"]) == 3 for r in rows if r["status"] == "finished")
    assert all(int(r["epochs"]) < 3 for r in rows if r["status"] == "stopped early")
    scores = [float(r["best_val_miou"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    for r in rows:
        assert (r["focal_gamma"] != "") == (r["loss"] == "focal")
    assert rows[0]["trial_id"] in result.stdout  # the leaderboard is printed too
    # then the best trial's score, searched parameters and checkpoint folder
    best = re.search(r"Best trial (\S+): val_miou ([\d.]+) .*\n  config:\n((?:    .*\n)+)  checkpoint: (.+)",
                     result.stdout)
    assert best and best.group(1) == rows[0]["trial_id"], result.stdout[-2000:]
    assert abs(float(best.group(2)) - float(rows[0]["best_val_miou"])) < 1e-3
    assert f"    decoder: {rows[0]['decoder']}\n" in best.group(3) and "data_root" not in best.group(3)
    assert (Path(best.group(4)) / "model.pt").is_file()


def test_the_console_shows_a_progress_table_and_the_log_holds_everything(experiment):
    path, result = experiment
    lines = result.stdout.splitlines()
    assert len(lines) <= 60 and "Traceback" not in result.stdout + result.stderr, result.stdout
    header = next(line for line in lines if line.startswith("trial "))
    assert all(name in header for name in ("decoder", "backbone", "loss", "augmentation", "lr", "best_val_miou"))
    log = (path / "driver.log").read_text()
    assert any(line.startswith("Full output: ") for line in lines) and header in log and "Leaderboard" in log
    assert "Trial status" in log or "trial" in log.lower()  # Tune's own output went to the log only
    assert not any("Checkpoint successfully created" in line for line in lines)


def test_the_optuna_study_is_kept_in_the_experiment_and_every_storage_leaderboard(experiment):
    import optuna

    path, _ = experiment
    study = optuna.load_study(study_name="e2e", storage=f"sqlite:///{path / 'optuna.db'}")
    assert len(study.trials) == len(_leaderboard(path))
    every = _leaderboard(path.parent)  # runs/leaderboard.csv: all experiments under the storage folder
    assert {r["experiment"] for r in every} >= {"e2e"} and len([r for r in every if r["experiment"] == "e2e"]) == 6


def test_a_warm_start_begins_with_the_best_configurations_of_an_earlier_experiment(experiment, sample_root):
    path, _ = experiment
    best = read_trials(path)
    best = min((t for t in best if t.checkpoint), key=lambda t: t.sort_key())
    space = path.parent.parent / "warm.yaml"
    space.write_text(TINY_SPACE.replace("num_samples: 6, max_epochs: 3", "num_samples: 1, max_epochs: 1"))
    storage = path.parent.parent / "warm-runs"  # not beside e2e: other tests take the most recent experiment there
    result = run_cli("launch.py", "--space", space, "--data", sample_root, "--storage", storage, "--name", "warm",
                     "--warm-start", path, "--no-wandb")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Warm start: the first" in result.stdout
    [trial] = read_trials(storage / "warm")
    assert all(trial.config[k] == best.config[k] for k in TINY_PARAMS if k in best.config)


def test_the_first_trial_is_the_one_the_space_names(experiment):
    path, _ = experiment
    wanted = {"decoder": "FPN", "backbone": "mobilenet_v2", "loss": "ce", "augmentation": "none", "lr": 0.005}
    matching = [t for t in read_trials(path) if all(t.config.get(k) == v for k, v in wanted.items())]
    assert len(matching) == 1 and "focal_gamma" not in matching[0].config


def test_best_checkpoint_is_a_plain_state_dict_with_a_rebuild_description(experiment):
    path, _ = experiment
    best = _leaderboard(path)[0]
    [checkpoint] = [c for c in path.glob(f"*{best['trial_id']}*/checkpoint_*")]
    meta = json.loads((checkpoint / "model.json").read_text())
    assert meta["decoder"] == best["decoder"] and meta["backbone"] == best["backbone"]
    assert meta["input_size"] == [64, 64] and meta["class_names"][0] == "Background" and meta["num_classes"] == 11
    assert abs(meta["metrics"]["val_miou"] - float(best["best_val_miou"])) < 1e-4
    state = torch.load(checkpoint / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_ensemble_writes_a_submission_in_test_order(experiment, sample_root):
    path, _ = experiment
    out = path.parent / "submission.csv"
    result = run_cli("ensemble_select.py", "--experiment", path, "--topk", "5", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Selection path" in result.stdout and "Ensemble val mIoU" in result.stdout
    test = CocoSegmentation(sample_root, "test.json")
    rows = read_submission(out)
    assert [name for name, _ in rows] == [test.file_name(i) for i in test.image_ids]
    for _, labels in rows:
        assert labels.shape == (256 * 256,) and 0 <= labels.min() and labels.max() < test.num_classes
    summary = json.loads(out.with_name("ensemble.json").read_text())
    weights = [m["weight"] for m in summary["members"]]
    assert abs(sum(weights) - 1) < 1e-9 and len(weights) <= 5
    assert summary["val_miou"] >= max(m["val_miou"] for m in summary["members"])
    best_member = max(m["val_miou"] for m in summary["members"])
    assert summary["selection"]["best_member_val_miou"] == best_member
    assert summary["selection_path"][0]["val_miou"] >= best_member
    assert summary["selection"]["tried"]["best member"] <= summary["selection_val_miou"]
    assert summary["selection"]["gain_over_best_member"] == summary["selection_val_miou"] - best_member
    # a subset of several members is tried only when it scores above every member alone
    combined = "best subset" in summary["selection"]["tried"]
    assert combined <= (summary["selection_val_miou"] > best_member)
    assert (summary["selection_val_miou"] > best_member) == (summary["selection"]["members_with_weight"] > 1)
    assert len({m["config"]["backbone"] for m in summary["members"]}) == 1


def test_per_class_refinement_reports_class_weights_and_never_scores_below_greedy(experiment):
    path, _ = experiment
    out = path.parent / "per-class" / "submission.csv"
    result = run_cli("ensemble_select.py", "--experiment", path, "--topk", "3", "--per-class", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.with_name("ensemble.json").read_text())
    class_names = list(summary["per_class_iou"])
    assert summary["val_miou"] >= summary["selection_val_miou"]
    assert all(list(m["weight"]) == class_names for m in summary["members"])  # one weight per class
    assert all(list(m["per_class_iou"]) == class_names for m in summary["members"])
    assert ("Per-class ensemble val mIoU" in result.stdout) == bool(summary["per_class_path"])
    for step in summary["per_class_path"]:
        assert step["class_name"] == class_names[step["class"]]
    assert len(read_submission(out)) > 0
    # every member is timed; the ensemble's time is that of the members with a weight
    used = [m["ms_per_image"] for m in summary["members"] if any(m["weight"].values())]
    assert all(m["ms_per_image"] > 0 for m in summary["members"])
    assert abs(summary["ms_per_image"] - sum(used)) < 1e-9 and "ms per image" in result.stdout


def test_a_latency_budget_no_candidate_fits_is_a_one_line_error(experiment):
    path, _ = experiment
    out = path.parent / "budget" / "submission.csv"
    result = run_cli("ensemble_select.py", "--experiment", path, "--topk", "2", "--latency-budget", "0.001",
                     "--out", out)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr[-2000:]
    assert "--latency-budget 0.001 ms: no candidate fits" in result.stderr and "the fastest takes" in result.stderr
    assert not out.exists()


def test_pseudo_labels_cover_every_test_image_and_a_later_search_accepts_them(experiment, sample_root, tmp_path):
    from data_pipeline.pseudo_labels import UNCERTAIN, pseudo_class_map

    path, _ = experiment
    pseudo = sample_root / "pseudo-cli.json"
    try:
        out = path.parent / "pseudo" / "submission.csv"
        result = run_cli("ensemble_select.py", "--experiment", path, "--topk", "2", "--out", out,
                         "--pseudo-labels", pseudo, "--pseudo-threshold", "0.5")
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads(out.with_name("ensemble.json").read_text())
        test = CocoSegmentation(sample_root, "test.json")
        info = summary["pseudo_labels"]
        assert info["images"] == len(test.image_ids) and 0 < info["confident_share"] <= 1 and info["threshold"] == 0.5
        class_names = list(summary["per_class_iou"])
        back = CocoSegmentation(sample_root, pseudo.name, class_map=pseudo_class_map(class_names))
        assert back.class_names == class_names
        assert json.loads(pseudo.read_text())["categories"][-1]["name"] == UNCERTAIN
        # where the pseudo-labels are sure, they are the submission's labels (both at 256 x 256 here
        # only through nearest resizing, so compare on the label sets)
        first = back.image_ids[0]
        submitted = dict(read_submission(out))[back.file_name(first)]
        assert set(np.unique(back.label_map(first))) - {255} <= set(np.unique(submitted))
        (tmp_path / "space.yaml").write_text(TINY_SPACE.replace("space:\n", f"data: {{pseudo_labels: [{pseudo.name}]}}\nspace:\n"))
        dry = run_cli("launch.py", "--space", tmp_path / "space.yaml", "--data", sample_root, "--dry-run",
                      "--storage", tmp_path / "runs")
        assert dry.returncode == 0, dry.stderr[-2000:]
        assert f"{len(test.image_ids)} pseudo-labelled images" in dry.stdout
    finally:
        pseudo.unlink(missing_ok=True)


def test_topk_one_is_the_best_single_model_of_the_most_recent_experiment(experiment):
    path, _ = experiment
    result = run_cli("ensemble_select.py", "--storage", path.parent, "--topk", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((path / "ensemble" / "ensemble.json").read_text())
    assert [m["weight"] for m in summary["members"]] == [1.0]
    assert summary["members"][0]["trial_id"] == _leaderboard(path)[0]["trial_id"]
    assert len(read_submission(path / "ensemble" / "submission.csv")) > 0


@pytest.mark.parametrize("args, message", [
    (["--space", "no/such/space.yaml"], "error: search space file no/such/space.yaml does not exist"),
    (["--data", "/no/such/data"], "error: data root /no/such/data does not exist"),
    (["--gpus", "-1"], "--gpus must be >= 0"),
    (["--gpus", "1000"], "error: --gpus 1000 asks for more GPUs than this machine has"),
])
def test_launch_rejects_bad_arguments_in_one_line(args, message, tmp_path):
    result = run_cli("launch.py", *args, "--storage", tmp_path, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_plan_whose_trials_need_more_cpus_than_the_machine_has_is_refused_before_ray(sample_root, tmp_path):
    import os

    (tmp_path / "space.yaml").write_text(f"experiment: {{cpus_per_trial: {(os.cpu_count() or 1) + 1}}}\n"
                                         "space: {decoder: Unet, backbone: resnet18}\n")
    result = run_cli("launch.py", "--space", tmp_path / "space.yaml", "--data", sample_root, "--dry-run",
                     "--storage", tmp_path / "runs", timeout=120)
    assert result.returncode == 2 and "experiment.cpus_per_trial is" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_a_dataset_of_symbolic_links_passes_the_dry_run(sample_root, tmp_path):
    # Kaggle and Colab mount data as links: every image folder and annotation file here is one.
    data = tmp_path / "data"
    data.mkdir()
    for entry in sample_root.iterdir():
        (data / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    result = run_cli("launch.py", "--data", data, "--dry-run", "--storage", tmp_path / "runs", timeout=120)
    assert result.returncode == 0 and "Dry run: nothing started." in result.stdout, result.stderr[-2000:]
    assert f"Training data by source:\n  task data {data / 'train.json'}: 24 images, " in result.stdout


def test_a_condition_that_can_never_hold_and_wandb_online_without_credentials_are_warned_of(sample_root, tmp_path):
    (tmp_path / "space.yaml").write_text(
        "space: {decoder: Unet, backbone: resnet18, loss: ce, focal_gamma: {uniform: [0.5, 2.0], when: {loss: focal}}}\n")
    result = run_cli("launch.py", "--space", tmp_path / "space.yaml", "--data", sample_root, "--dry-run",
                     "--wandb", "online", "--storage", tmp_path / "runs", timeout=120,
                     env={"HOME": str(tmp_path), "WANDB_API_KEY": "", "NETRC": str(tmp_path / "none")})
    assert result.returncode == 0, result.stderr
    assert "space.focal_gamma is never sampled: its `when` needs loss in ['focal']" in result.stderr
    assert "wandb is online but no credentials were found" in result.stderr


def test_the_class_filter_is_fitted_on_val_and_applied_to_the_test_predictions(experiment):
    path, _ = experiment
    runs = {}
    for name, flags in (("filtered", ()), ("plain", ("--no-class-filter",))):
        out = path.parent / name / "submission.csv"
        result = run_cli("ensemble_select.py", "--experiment", path, "--topk", "3", "--out", out, *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (json.loads(out.with_name("ensemble.json").read_text()), read_submission(out))
    (filtered, rows), (plain, plain_rows) = runs["filtered"], runs["plain"]
    assert plain["class_filter"] is None and "Class filter:" not in result.stdout
    rule = filtered["class_filter"]
    assert rule["val_miou_before"] == pytest.approx(plain["val_miou"])
    assert filtered["val_miou"] == pytest.approx(rule["val_miou_before"] + rule["val_gain"]) and rule["val_gain"] >= 0
    names = list(filtered["per_class_iou"])
    never = [names.index(n) for n, t in rule["rules"].items() if t > 1]
    for (name, labels), (plain_name, plain_labels) in zip(rows, plain_rows):
        assert name == plain_name
        changed = labels != plain_labels
        assert (labels[changed] == 0).all()  # the filter only turns pixels into background
        assert not np.isin(labels, never).any()


def test_class_scales_are_chosen_on_val_with_the_weights_and_recorded(experiment):
    path, _ = experiment
    runs = {}
    for name, flags in (("scaled", ()), ("unscaled", ("--no-class-scales",))):
        out = path.parent / name / "submission.csv"
        result = run_cli("ensemble_select.py", "--experiment", path, "--topk", "3", "--out", out, "--no-class-filter",
                         *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = json.loads(out.with_name("ensemble.json").read_text()), result.stdout
    (scaled, scaled_log), (unscaled, unscaled_log) = runs["scaled"], runs["unscaled"]
    assert "Class scales:" in scaled_log and "Class scales:" not in unscaled_log
    assert unscaled["class_scales"] is None and unscaled["val_miou"] == pytest.approx(unscaled["selection_val_miou"])
    rule = scaled["class_scales"]
    assert rule["val_miou_before"] == pytest.approx(unscaled["val_miou"])
    assert scaled["val_miou"] == pytest.approx(rule["val_miou_before"] + rule["val_gain"])
    assert "selection" in rule["tried"] and rule["weights_of"] in rule["tried"]
    assert set(rule["rules"]) <= set(scaled["per_class_iou"]) - {"Background"}
    assert all(factor != 1.0 for factor in rule["rules"].values())
    weights = {m["trial_id"]: m["weight"] for m in scaled["members"]}
    if rule["weights_of"] == "selection":
        assert weights == {m["trial_id"]: m["weight"] for m in unscaled["members"]}
    else:  # equal weights of the best N members by val mIoU
        count = int(rule["weights_of"].split()[1])
        by_val = sorted(scaled["members"], key=lambda m: -m["val_miou"])
        assert [weights[m["trial_id"]] for m in by_val] == pytest.approx([1 / count] * count + [0] * (len(by_val) - count))


def test_a_checkout_that_is_not_the_installed_one_is_refused(tmp_path):
    copy = tmp_path / "checkout"
    copy.mkdir()
    shutil.copy(ROOT / "launch.py", copy / "launch.py")
    result = subprocess.run([sys.executable, str(copy / "launch.py"), "--dry-run"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: this Python imports the project from {ROOT}, not from {copy}; run ")
    assert "-m pip install -e" in result.stderr


def test_ensemble_without_experiments_is_a_one_line_error(tmp_path):
    result = run_cli("ensemble_select.py", "--storage", tmp_path / "empty", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no experiment found" in result.stderr


def test_bad_images_stop_launch_before_ray_starts_unless_skip_bad(sample_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_root, data)
    val = CocoSegmentation(data, "val.json")
    victim = val.file_name(val.image_ids[0])
    (data / victim).unlink()
    result = run_cli("launch.py", "--data", data, "--storage", tmp_path / "runs", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and f"val.json: {victim}: image id" in result.stderr
    assert "--skip-bad" in result.stderr and not (tmp_path / "runs").exists()

    # an external dataset with a broken image of its own trains too, without that image
    external = make_external(tmp_path / "external")
    (external / "ext_1.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "taco_to_task.yaml").write_text(EXTERNAL_CLASS_MAP)
    (tmp_path / "space.yaml").write_text(
        TINY_SPACE.replace("num_samples: 6", "num_samples: 1").replace("max_epochs: 3", "max_epochs: 1")
        .replace("space:\n", "data: {extra: [{root: external, annotations: annotations.json, "
                              "class_map: taco_to_task.yaml, share: 0.2}]}\nspace:\n"))
    result = run_cli("launch.py", "--space", tmp_path / "space.yaml", "--data", data, "--skip-bad",
                     "--storage", tmp_path / "runs", "--name", "skipped")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: leaving out 1 of" in result.stderr and victim in result.stderr
    assert f"leaving out 1 of 4 image(s) of {external / 'annotations.json'}" in result.stderr
    [meta] = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "skipped").rglob("model.json")]
    assert victim not in meta["val_images"] and len(meta["val_images"]) == len(val.image_ids) - 1
    assert [source["skip"] for source in meta["config"]["extra_data"]] == [["ext_1.jpg"]]
    launched = json.loads((tmp_path / "runs" / "skipped" / "launch.json").read_text())
    [row] = csv.DictReader((tmp_path / "runs" / "skipped" / "leaderboard.csv").open())
    assert launched["extra_data"] == [str(external / "annotations.json")] == [row["extra_data"]]


def test_a_bad_test_image_stops_launch_even_with_skip_bad(sample_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_root, data)
    test = CocoSegmentation(data, "test.json")
    (data / test.file_name(test.image_ids[0])).write_bytes(b"not a jpeg")
    result = run_cli("launch.py", "--data", data, "--skip-bad", "--storage", tmp_path / "runs", timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "test.json cannot be used (test images cannot be skipped" in result.stderr
    assert test.file_name(test.image_ids[0]) in result.stderr


def test_when_every_trial_fails_launch_and_ensemble_say_so(sample_root, tmp_path):
    (tmp_path / "space.yaml").write_text(TINY_SPACE.replace("num_samples: 6", "num_samples: 2")
                                         + "  encoder_weights: imagenet\n")
    result = run_cli("launch.py", "--space", tmp_path / "space.yaml", "--data", sample_root,
                     "--storage", tmp_path / "runs", "--name", "broken", env=cache_unreadable_weights(tmp_path / "hf", "resnet18", "mobilenet_v2"))
    assert result.returncode == 1 and "no trial reported a val mIoU" in result.stderr
    assert "2 trial(s) errored" in result.stderr and "as encoder_weights 'imagenet' of backbone " in result.stderr
    assert {r["status"] for r in _leaderboard(tmp_path / "runs" / "broken")} == {"errored"}
    result = run_cli("ensemble_select.py", "--experiment", tmp_path / "runs" / "broken")
    assert result.returncode == 2 and "no trial with a checkpoint" in result.stderr
    assert not (tmp_path / "runs" / "broken" / "ensemble").exists()


def test_score_cli_rates_the_ensemble_submission_against_test_ground_truth(experiment, sample_root):
    path, _ = experiment
    out = path.parent / "scored.csv"
    assert run_cli("ensemble_select.py", "--experiment", path, "--topk", "2", "--out", out).returncode == 0
    result = run_cli("-m", "search.score", out, "--data", sample_root, timeout=120)
    assert result.returncode == 0, result.stderr
    miou = float(result.stdout.strip().splitlines()[-1].split()[1])
    assert 0 < miou < 1


def test_backbone_auto_with_flip_tta_keeps_the_best_backbone_group(experiment):
    path, _ = experiment
    out = path.parent / "auto" / "submission.csv"
    result = run_cli("ensemble_select.py", "--experiment", path, "--topk", "3", "--backbone", "auto",
                     "--tta", "flip", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.with_name("ensemble.json").read_text())
    backbones = {r["backbone"] for r in _leaderboard(path) if r["best_val_miou"]}
    assert set(summary["groups"]) == backbones and summary["tta"] == "flip"
    assert summary["val_miou"] == max(summary["groups"].values())
    assert summary["backbone"] == max(summary["groups"], key=summary["groups"].get)
    if len(backbones) > 1:
        assert "Backbone groups by ensemble val mIoU" in result.stdout


def test_val_probabilities_are_cached_for_later_runs(experiment):
    path, _ = experiment
    runs = [run_cli("ensemble_select.py", "--experiment", path, "--topk", "2", "--size", "128",
                    "--out", path.parent / f"cache{i}" / "submission.csv") for i in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    members = int(re.search(r"Val probabilities: 0 of (\d+) read from", runs[0].stdout).group(1))
    assert f"Val probabilities: {members} of {members} read from" in runs[1].stdout
    assert len(list((path / "ensemble" / "val_cache").glob("*.npy"))) >= members
    first, second = (path.parent / f"cache{i}" / "submission.csv" for i in range(2))
    assert first.read_bytes() == second.read_bytes()


def test_a_second_search_on_the_same_machine_gets_another_dashboard_port(sample_root, tmp_path):
    import socket

    (tmp_path / "space.yaml").write_text(TINY_SPACE.replace("num_samples: 6, max_epochs: 3", "num_samples: 1, max_epochs: 1"))
    with socket.socket() as holder:  # stands in for the dashboard of a search already running
        try:
            holder.bind(("127.0.0.1", 8265))
            holder.listen()
        except OSError:
            pass  # something already holds the port, which is the case under test too
        result = run_cli("launch.py", "--space", tmp_path / "space.yaml", "--data", sample_root,
                         "--storage", tmp_path / "runs", "--name", "second")
    assert result.returncode == 0, result.stderr[-3000:]
    url = re.search(r"Ray dashboard: http://127\.0\.0\.1:(\d+)", result.stdout)
    assert url and url.group(1) != "8265"


def _referenced_images(html_path):
    return re.findall(r'<img src="([^"]+)"', html_path.read_text())


def test_the_search_writes_a_report_whose_figures_hold_every_trial(experiment):
    path, result = experiment
    report = path / "report" / "report.html"
    assert f"Report: {report}" in result.stdout
    images = _referenced_images(report)
    assert {"curves.png", "progress.png", "importance.png", "slices.png"} <= set(images)
    assert all((report.parent / name).stat().st_size > 1000 for name in images)
    data = json.loads((report.parent / "report.json").read_text())
    rows = _leaderboard(path)
    assert sorted(data["trials"]) == sorted(r["trial_id"] for r in rows)
    for r in rows:  # each trial's curve has one point per epoch it trained
        assert len(data["curves"][r["trial_id"]]["values"]) == int(r["epochs"])
        assert r["trial_id"] in report.read_text()
    assert abs(sum(data["importances"].values()) - 1) < 1e-6 and set(data["importances"]) <= set(TINY_PARAMS)
    assert abs(max(data["progress"]["best"]) - max(float(r["best_val_miou"]) for r in rows)) < 1e-4
    # lr, a continuous parameter, gets a scatter slice (log axis over 1e-3..1e-2); choices get groups
    assert data["slices"]["lr"]["continuous"] and len(data["slices"]["lr"]["x"]) == len(rows)
    assert not data["slices"]["decoder"]["continuous"] and set(data["slices"]["decoder"]["groups"]) <= {"Unet", "FPN"}
    assert "Importances from 6 trials are a rough ranking" in report.read_text()  # 6 < IMPORTANCE_TRIALS
    assert all(label.startswith(tid) and "decoder=" in label for tid, label in data["labels"].items())


def test_ensemble_select_adds_the_ensemble_to_the_report(experiment):
    path, _ = experiment
    result = run_cli("ensemble_select.py", "--experiment", path, "--topk", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    report = path / "report" / "report.html"
    images = _referenced_images(report)
    assert {"ensemble_classes.png", "confusion.png", "worst_images.png"} <= set(images)
    assert all((report.parent / name).is_file() for name in images)
    summary = json.loads((path / "ensemble" / "ensemble.json").read_text())
    confusion = np.asarray(summary["confusion"])
    assert confusion.shape == (len(summary["per_class_iou"]),) * 2 and confusion.sum() > 0
    assert "Ensemble inference" not in report.read_text() and f"{summary['val_miou']:.4f}" in report.read_text()
    worst = json.loads((report.parent / "report.json").read_text())["worst_images"]
    scores = [w["miou"] for w in worst]
    assert 0 < len(worst) <= 6 and scores == sorted(scores) and all(0 <= v <= 1 for v in scores)
    assert all(w["confusions"] and "→" in w["confusions"][0] for w in worst if w["miou"] < 1)
    val = CocoSegmentation(Path(summary["data_root"]), "val.json")
    assert {w["file_name"] for w in worst} <= {val.file_name(i) for i in val.image_ids}  # named by file


def test_report_of_a_folder_that_is_not_an_experiment_is_a_one_line_error(tmp_path):
    result = run_cli("-m", "search.report", tmp_path, timeout=120)
    assert result.returncode == 2 and "is not a Ray Tune experiment folder" in result.stderr


def test_predict_labels_new_images_at_their_own_size_as_the_submission_does(experiment, sample_root, tmp_path):
    import cv2

    path, _ = experiment
    assert run_cli("ensemble_select.py", "--experiment", path, "--topk", "3").returncode == 0
    test = CocoSegmentation(sample_root, "test.json")
    names = [test.file_name(i) for i in test.image_ids[:3]]
    images = tmp_path / "new"
    images.mkdir()
    for name in names:
        shutil.copy(sample_root / name, images / Path(name).name)
    out = tmp_path / "predicted"
    result = run_cli("predict.py", images, "--experiment", path, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    submission = dict(read_submission(path / "ensemble" / "submission.csv"))
    legend = json.loads((out / "legend.json").read_text())
    for name in names:
        image = cv2.imread(str(images / Path(name).name))
        labels = cv2.imread(str(out / f"{Path(name).stem}.png"), cv2.IMREAD_UNCHANGED)
        assert labels.shape == image.shape[:2] and labels.max() < len(legend)
        assert cv2.imread(str(out / f"{Path(name).stem}_overlay.jpg")).shape == image.shape
        # the submission labelled the same image at 256 x 256 with the same members and rules
        at_256 = cv2.resize(labels, (256, 256), interpolation=cv2.INTER_NEAREST).reshape(-1)
        assert (at_256 == submission[name]).mean() > 0.9
    trial = _leaderboard(path)[0]["trial_id"]
    single = run_cli("predict.py", images / Path(names[0]).name, "--experiment", path, "--trial", trial,
                     "--out", tmp_path / "single")
    assert single.returncode == 0 and (tmp_path / "single" / f"{Path(names[0]).stem}.png").is_file(), single.stderr


@pytest.mark.parametrize("args, message", [
    (["missing.jpg"], "missing.jpg: no such file or folder"),
    (["IMAGES", "--trial", "nope"], "--trial nope: no such trial"),
])
def test_predict_mistakes_are_one_line_errors(experiment, sample_root, tmp_path, args, message):
    path, _ = experiment
    test = CocoSegmentation(sample_root, "test.json")
    image = sample_root / test.file_name(test.image_ids[0])
    args = [str(image) if a == "IMAGES" else a for a in args]
    result = run_cli("predict.py", *args, "--experiment", path, "--out", tmp_path / "out", timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
