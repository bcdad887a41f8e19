from pathlib import Path

import optuna
import pytest

from errors import UserError
from search.space import SpaceSampler, eval_size, load_space
from search.tune_runner import trial_constants

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["quick.yaml", "full.yaml", "cpu_real.yaml", "cpu_pretrained.yaml"])
def test_shipped_spaces_are_valid(name):
    spec = load_space(ROOT / "search_spaces" / name)
    assert {p.name for p in spec.params} >= {"decoder", "backbone", "loss", "lr", "resize", "batch_size"}


def test_the_pretrained_space_starts_from_its_measured_recipe():
    spec = load_space(ROOT / "search_spaces" / "cpu_pretrained.yaml")
    params = {p.name: p for p in spec.params}
    assert params["encoder_weights"].values == ("imagenet",) and params["backbone"].values[0].startswith("tu-")
    assert all(t["lr"] == 3.0e-3 for t in spec.first_trials) and params["lr"].admits(3.0e-3)
    # one trial on whole frames, one on crops of larger frames: two views for val (and the ensemble) to choose from
    assert [(t["resize"], t.get("crop")) for t in spec.first_trials] == [(160, None), (256, 160)]
    assert params["crop"].active({"resize": 256}) and not params["crop"].active({"resize": 160})


def test_sampler_suggests_focal_gamma_only_for_focal_loss(tmp_path):
    (tmp_path / "space.yaml").write_text(
        "space:\n  loss: {choice: [ce, focal]}\n  focal_gamma: {uniform: [0.5, 3.0], when: {loss: focal}}\n"
        "  lr: {loguniform: [3.0e-4, 5.0e-3]}\n  resize: 96\n")
    spec = load_space(tmp_path / "space.yaml")
    sampler = SpaceSampler(spec.params, {"data_root": "/data"})
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    seen_losses = set()
    for _ in range(30):
        trial = study.ask()
        constants = sampler(trial)
        params = {**trial.params, **constants}
        seen_losses.add(params["loss"])
        assert ("focal_gamma" in params) == (params["loss"] == "focal")
        if params["loss"] == "focal":
            assert 0.5 <= params["focal_gamma"] <= 3.0
        assert 3e-4 <= params["lr"] <= 5e-3
        assert constants["data_root"] == "/data" and constants["resize"] == 96
        study.tell(trial, 0.5)
    assert seen_losses == {"ce", "focal"}


def test_same_seed_gives_same_suggestions():
    spec = load_space(ROOT / "search_spaces" / "quick.yaml")

    def suggestions(seed):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        out = []
        for _ in range(5):
            trial = study.ask()
            SpaceSampler(spec.params, {})(trial)
            out.append(trial.params)
            study.tell(trial, 0.0)
        return out

    assert suggestions(3) == suggestions(3)


@pytest.mark.parametrize("text, message", [
    ("space: {decoder: {choice: [Unet, Unett]}}", r"space.decoder.choice: unknown decoder 'Unett' \(did you mean Unet"),
    ("space: {backbone: resnet1800}", r"space.backbone: unknown backbone 'resnet1800'"),
    ("space: {lr: {uniform: [0.1, 0.01]}}", r"space.lr.uniform: expected \[low, high\]"),
    ("space: {lr: {loguniform: [0, 0.01]}}", r"space.lr.loguniform: bounds must be positive"),
    ("space: {focal_gamma: {uniform: [0, 2], when: {loss: focal}}, loss: focal}", r"space.focal_gamma.when: 'loss' must be a parameter defined above"),
    ("space: {learning_rate: 0.1}", r"unknown key space.learning_rate"),
    ("space: {resize: 100}", r"space.resize: resize must be an integer multiple of 32"),
    ("space: {loss: {choice: [ce, hinge]}}", r"space.loss.choice: unknown loss 'hinge' \(choose from ce, focal"),
    ("experiment: {max_epochs: 2, grace_period: 3}\nspace: {lr: 0.1}", r"grace_period \(3\) exceeds max_epochs \(2\)"),
    ("experiment: {num_samples: many}\nspace: {lr: 0.1}", r"experiment.num_samples: expected int, got 'many'"),
    ("experiment: {scheduler: hyperband}\nspace: {lr: 0.1}", r"experiment.scheduler must be one of asha, fifo, got 'hyperband'"),
    ("experiment: {checkpoint: final}\nspace: {lr: 0.1}", r"experiment.checkpoint must be one of best, last, got 'final'"),
    ("experiment: {checkpoint_interval_s: -1}\nspace: {lr: 0.1}", r"experiment.checkpoint_interval_s must be >= 0 seconds, got -1"),
    ("space: {crop: 100}", r"space.crop: crop must be null \(whole images\) or an integer multiple of 32, got 100"),
    ("space: {resize: 128, crop: {choice: [96, 160]}}", r"space.crop: crop 160 is larger than resize 128"),
    ("space: {encoder_lr_scale: 2}", r"space.encoder_lr_scale: encoder_lr_scale must be a number in \(0, 1\]"),
    ("experimnt: {}\nspace: {lr: 0.1}", r"unknown key experimnt \(did you mean 'experiment'\?\)"),
    ("space: {}", r"'space' must be a non-empty mapping"),
    ("space: [1, 2", r"not valid YAML"),
])
def test_mistakes_are_reported_with_file_and_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(UserError, match=message) as info:
        load_space(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")


def test_yaml_is_read_safely(tmp_path):
    path = _write(tmp_path, "space: !!python/object/apply:os.system ['echo pwned']")
    with pytest.raises(UserError, match="not valid YAML"):
        load_space(path)


DATA_SPACE = """
data: {split: kfold, folds: 4, split_seed: 2, class_map: classes.yaml, unknown: ignore}
space:
  fold: {choice: [0, 1, 2, 3]}
  augmentation: {choice: [none, flip, strong, elastic, cutmix, copy_paste]}
  class_weights: {choice: [none, inverse, sqrt_inverse]}
  sampler: {choice: [uniform, rare]}
"""


def test_data_settings_and_data_params_reach_the_trial_constants(tmp_path):
    from search.tune_runner import trial_constants

    (tmp_path / "classes.yaml").write_text("map: {Rope: Background}\n")
    spec = load_space(_write(tmp_path, DATA_SPACE))
    assert spec.class_map.unknown_policy == "ignore" and spec.class_map.target("Rope") == "Background"
    constants = trial_constants(spec, Path("/data"), skip=["b.jpg", "a.jpg"])
    assert constants["split"] == "kfold" and constants["folds"] == 4 and constants["split_seed"] == 2
    assert constants["class_map"] == spec.class_map.to_dict() and constants["skip_images"] == ["a.jpg", "b.jpg"]
    assert "fold" not in constants  # searched, so it must not be overridden by a constant


@pytest.mark.parametrize("experiment, rungs", [
    ("{max_epochs: 8, grace_period: 1, reduction_factor: 2}", [1, 2, 4, 8]),
    ("{max_epochs: 10, grace_period: 2, reduction_factor: 3}", [2, 6]),
    ("{max_epochs: 8, scheduler: fifo}", []),
])
def test_trials_know_the_rungs_where_the_scheduler_may_stop_them(tmp_path, experiment, rungs):
    from search.tune_runner import trial_constants

    spec = load_space(_write(tmp_path, f"experiment: {experiment}\nspace: {{lr: 0.1}}"))
    constants = trial_constants(spec, Path("/data"))
    assert constants["rungs"] == rungs and constants["checkpoint_interval_s"] == 300.0


@pytest.mark.parametrize("data, space, message", [
    ("{split: random}", "", "data.split must be one of given, kfold"),
    ("{split: kfold, folds: 1}", "", "data.folds must be at least 2"),
    ("{unknown: drop}", "", "data.unknown must be one of keep, background, ignore"),
    ("{class_map: nope.yaml}", "", "data.class_map: .*nope.yaml does not exist"),
    ("{class_map: [a.yaml]}", "", r"data.class_map: expected str, got \['a.yaml'\]"),
    ("{}", "  fold: 1\n", "space.fold: folds exist only with data.split: kfold"),
    ("{split: kfold, folds: 3}", "  fold: {int: [0, 3]}\n", r"space.fold: folds are numbered 0..2"),
    ("{}", "  sampler: random\n", "space.sampler: unknown value 'random'"),
    ("{}", "  class_weights: {choice: [none, log]}\n", "space.class_weights.choice: unknown value 'log'"),
])
def test_bad_data_settings_name_the_key(tmp_path, data, space, message):
    path = _write(tmp_path, f"data: {data}\nspace:\n  lr: 0.001\n{space}")
    with pytest.raises(UserError, match=message):
        load_space(path)


def test_a_bad_class_map_file_is_reported_with_its_path(tmp_path):
    (tmp_path / "classes.yaml").write_text("mapp: {}\n")
    with pytest.raises(UserError, match=r"space.yaml: .*classes.yaml: unknown key mapp \(did you mean 'map'\?\)"):
        load_space(_write(tmp_path, "data: {class_map: classes.yaml}\nspace:\n  lr: 0.001\n"))


def test_the_ranking_metric_takes_its_own_direction(tmp_path):
    spec = load_space(_write(tmp_path, "experiment: {metric: val_loss}\nspace:\n  lr: 0.001\n"))
    assert spec.experiment.mode == "min"
    assert load_space(_write(tmp_path, "space:\n  lr: 0.001\n")).experiment.mode == "max"
    with pytest.raises(UserError, match="experiment.mode: val_loss is minimised, so mode must be min"):
        load_space(_write(tmp_path, "experiment: {metric: val_loss, mode: max}\nspace:\n  lr: 0.001\n"))
    with pytest.raises(UserError, match="experiment.metric must be one of val_miou, val_image_miou"):
        load_space(_write(tmp_path, "experiment: {metric: miou}\nspace:\n  lr: 0.001\n"))


def test_composite_losses_as_choices_or_a_fixed_mapping_and_when_matches_their_terms(tmp_path):
    spec = load_space(_write(tmp_path, """
space:
  loss: {choice: [ce, focal+dice, 0.5*ce+0.5*dice]}
  focal_gamma: {uniform: [0.5, 3.0], when: {loss: focal}}
"""))
    gamma = spec.params[1]
    assert gamma.active({"loss": "focal+dice"}) and gamma.active({"loss": "focal"})
    assert not gamma.active({"loss": "0.5*ce+0.5*dice"}) and not gamma.active({"loss": "ce"})
    fixed = load_space(_write(tmp_path, "space:\n  loss: {ce: 0.5, dice: 0.5}\n")).params[0]
    assert fixed.kind == "fixed" and fixed.values == ({"ce": 0.5, "dice": 0.5},)
    with pytest.raises(UserError, match=r"space.loss.choice: unknown loss 'dcie' in 'ce\+dcie' \(did you mean 'dice'\?\)"):
        load_space(_write(tmp_path, "space:\n  loss: {choice: [ce, ce+dcie]}\n"))


def test_decoder_backbone_pairs_and_weight_names_are_checked_before_any_trial(tmp_path):
    with pytest.raises(UserError, match=r"space: smp cannot build DeepLabV3 with backbone inceptionresnetv2"):
        load_space(_write(tmp_path, "space:\n  decoder: {choice: [Unet, DeepLabV3]}\n"
                                    "  backbone: {choice: [resnet18, inceptionresnetv2]}\n"))
    with pytest.raises(UserError, match=r"space: backbone resnet18 has no encoder_weights 'imagenet21k'"):
        load_space(_write(tmp_path, "space:\n  backbone: resnet18\n  encoder_weights: imagenet21k\n"))


@pytest.mark.parametrize("mode, seeds", [("per_trial", [7, 8, 9]), ("shared", [7, 7, 7])])
def test_each_trial_trains_from_its_own_seed_unless_the_space_shares_one(tmp_path, mode, seeds):
    spec = load_space(_write(tmp_path, f"experiment:\n  seed: 7\n  trial_seeds: {mode}\n"
                                       "space:\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\nfirst_trials:\n  - {lr: 0.001}\n"))
    sampler = SpaceSampler(spec.params, {"seed": spec.experiment.seed}, spec.experiment.seed_per_trial)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial(spec.first_trials[0])  # a first trial is trial 0 of the study, with its seed
    trials = [study.ask() for _ in range(3)]
    assert [sampler(t)["seed"] for t in trials] == seeds


def test_an_unknown_trial_seeds_mode_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"experiment.trial_seeds must be one of per_trial, shared, got 'each'"):
        load_space(_write(tmp_path, "experiment:\n  trial_seeds: each\nspace:\n  lr: 0.001\n"))


@pytest.mark.parametrize("experiment, size", [("", 256), ("  eval_size: 224\n", 224)])
def test_trials_of_every_input_size_are_scored_on_one_val_size(tmp_path, experiment, size):
    spec = load_space(_write(tmp_path, f"experiment:\n  seed: 0\n{experiment}"
                                       "space:\n  resize: {choice: [96, 256, 160]}\n"))
    assert eval_size(spec) == size  # by default the largest input size the space proposes
    assert trial_constants(spec, tmp_path)["eval_size"] == size


def test_a_negative_eval_size_names_the_key(tmp_path):
    with pytest.raises(UserError, match=r"experiment.eval_size must be a size in pixels, or 0 .* got -1"):
        load_space(_write(tmp_path, "experiment:\n  eval_size: -1\nspace:\n  lr: 0.001\n"))


def test_first_trials_are_what_optuna_evaluates_before_it_proposes(tmp_path):
    import optuna

    from search.space import SpaceSampler

    body = ("space:\n  decoder: {choice: [Unet, FPN]}\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
            "  focal_gamma: {uniform: [0.5, 3.0], when: {decoder: FPN}}\n"
            "first_trials:\n  - {decoder: FPN, lr: 0.001, focal_gamma: 1.0}\n  - {decoder: Unet}\n")
    spec = load_space(_write(tmp_path, body))
    assert spec.first_trials == ({"decoder": "FPN", "lr": 0.001, "focal_gamma": 1.0}, {"decoder": "Unet"})
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for point in spec.first_trials:
        study.enqueue_trial(point)
    sampler = SpaceSampler(spec.params, {})
    first, second = study.ask(), study.ask()
    sampler(first), sampler(second)
    assert first.params == {"decoder": "FPN", "lr": 0.001, "focal_gamma": 1.0}
    assert second.params["decoder"] == "Unet" and "focal_gamma" not in second.params


@pytest.mark.parametrize("first, message", [
    ("[{lr: 0.5}]", r"first_trials\[0\].lr: 0.5 is not among the space's values \(loguniform"),
    ("[{decoder: PSPNet}]", r"first_trials\[0\].decoder: 'PSPNet' is not among the space's values"),
    ("[{batch_size: 8}]", r"unknown key first_trials\[0\].batch_size"),
    ("[{decoder: Unet, focal_gamma: 1.0}]", r"first_trials\[0\].focal_gamma: not searched in this trial"),
    ("{decoder: Unet}", r"first_trials: expected a list of mappings"),
])
def test_bad_first_trials_name_the_trial_and_key(tmp_path, first, message):
    body = ("space:\n  decoder: {choice: [Unet, FPN]}\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n  batch_size: 8\n"
            f"  focal_gamma: {{uniform: [0.5, 3.0], when: {{decoder: FPN}}}}\nfirst_trials: {first}\n")
    with pytest.raises(UserError, match=message):
        load_space(_write(tmp_path, body))
