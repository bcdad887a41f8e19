from pathlib import Path

import optuna
import pytest

from errors import UserError
from search.space import SpaceSampler, load_space

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["quick.yaml", "full.yaml"])
def test_shipped_spaces_are_valid(name):
    spec = load_space(ROOT / "search_spaces" / name)
    assert {p.name for p in spec.params} >= {"decoder", "backbone", "loss", "focal_gamma", "lr"}


def test_sampler_suggests_focal_gamma_only_for_focal_loss():
    spec = load_space(ROOT / "search_spaces" / "quick.yaml")
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
    ("space: {loss: {choice: [ce, hinge]}}", r"space.loss.choice: unknown value 'hinge'"),
    ("experiment: {max_epochs: 2, grace_period: 3}\nspace: {lr: 0.1}", r"grace_period \(3\) exceeds max_epochs \(2\)"),
    ("experiment: {num_samples: many}\nspace: {lr: 0.1}", r"experiment.num_samples: expected int, got 'many'"),
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
