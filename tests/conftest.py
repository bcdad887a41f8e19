"""Shared fixtures: a small generated sample dataset and helpers to run the real CLIs."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("WANDB_MODE", "offline")
# Tiny models on a shared 2-core machine: two OpenMP threads make their forward passes many times
# slower than one. Trials started by the CLIs set their own thread counts.
torch.set_num_threads(1)
# Decoded-split cache of this test session (inherited by the CLIs and Ray workers the tests start).
os.environ["SEGSEARCH_CACHE"] = tempfile.mkdtemp(prefix="segsearch-tests-")


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """A small sample dataset (generated, deterministic) shared by the whole session."""
    from data_pipeline.sample_data import generate_sample_dataset

    return generate_sample_dataset(tmp_path_factory.mktemp("data") / "sample", n_train=24, n_val=8, n_test=6,
                                   width=160, height=120, seed=0)


def run_cli(script: str, *args, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs launch.py / ensemble_select.py (or `-m module`) as a user would, in a fresh interpreter."""
    command = [script] if script == "-m" else [str(ROOT / script)]
    return subprocess.run([sys.executable, *command, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


SMP_RESNET18_REVISION = "3f2325ff978283d47aa6a1d6878ca20565622683"  # pinned in smp 0.6.0's resnet encoders
SHARED_WEIGHTS = ROOT.parent / "shared" / "weights" / "hf-hub"  # ImageNet EfficientNet-Lite0..2, read-only


def use_hub_cache(monkeypatch, cache: Path, offline: bool = True) -> None:
    """Points Hugging Face hub reads at cache, as a user does with HF_HUB_CACHE and HF_HUB_OFFLINE:
    in the environment (for the processes a test starts) and in huggingface_hub's constants, which
    this process read when it imported the library."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


def put_in_hf_cache(hub_cache: Path, repo_id: str, filename: str, content, revision: str | None = None) -> None:
    """Writes a file where huggingface_hub keeps a downloaded one (models--org--name/snapshots/<commit>/):
    content is a dict of tensors (saved as safetensors) or raw bytes."""
    from safetensors.torch import save_file

    commit = revision or "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    path = repo / "snapshots" / commit / filename
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        save_file(content, str(path))
    if revision is None:  # the branch `main` points at the commit
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)


def cache_unreadable_weights(hf_home: Path, *backbones: str) -> dict:
    """A Hugging Face home whose cache holds truncated ImageNet files of the smp backbones: launch finds
    them, every trial fails loading them. Returns the environment that points the CLIs there, offline."""
    from models.weights import weights_source

    for backbone in backbones:
        source = weights_source(backbone, "imagenet")
        put_in_hf_cache(hf_home / "hub", source.repo_id, source.filenames[0], b"truncated download", source.revision)
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def shared_weights(monkeypatch) -> Path:
    """The shared offline cache of pretrained EfficientNet-Lite weights; skips where it is absent."""
    if not SHARED_WEIGHTS.is_dir():
        pytest.skip(f"{SHARED_WEIGHTS} is absent")
    use_hub_cache(monkeypatch, SHARED_WEIGHTS)
    return SHARED_WEIGHTS


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(os.environ["SEGSEARCH_CACHE"], ignore_errors=True)
