"""Where a pretrained encoder's files come from, and the input normalisation it was trained with.

Pretrained files live in the Hugging Face hub cache as `huggingface_hub` resolves it (`HF_HUB_CACHE`,
`HF_HOME`, `HF_HUB_OFFLINE`, `HF_ENDPOINT`), or for a few timm models in the torch hub cache. A file
is downloaded only when the hub is reachable and not switched off; a missing one is a one-line
UserError naming the repo, the file and the folder it belongs in. Nothing here builds a model
(models.factory does), and nothing ever stands in random weights for missing ones.

Names: a backbone here is already checked (models.factory.check_backbone); `encoder_weights` is
smp's name (`imagenet`, `ssl`, ...) or, for `tu-` encoders, `imagenet` (timm's default tag) or a tag.
"""
from __future__ import annotations

import functools
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError
from huggingface_hub.file_download import repo_folder_name

from errors import UserError, short_reason

TIMM_PREFIX = "tu-"
IMAGENET = "imagenet"  # for tu- encoders: timm's default pretrained tag of the model
SMP_CONFIG_FILE = "config.json"  # beside an smp-hub repo's weights: its preprocessing (mean, std)

# The input normalisation of random-init encoders, and of smp-hub weights whose config.json is not in
# the cache: the ImageNet statistics, which nearly every smp and torchvision encoder was trained with.
DEFAULT_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

_PROBE_TIMEOUT_S = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@dataclass(frozen=True)
class WeightsSource:
    """Where the pretrained file of one (backbone, encoder_weights) comes from: a Hugging Face hub repo
    (smp-hub/<encoder>.<weights> for smp encoders, timm/<model>.<tag> for most timm ones) or a URL that
    lands in the torch hub cache (<torch hub>/checkpoints/<file>)."""

    backbone: str
    weights: str
    repo_id: str = ""
    revision: str | None = None
    filenames: tuple[str, ...] = ()  # alternatives, first found wins
    url: str = ""
    timm_name: str = ""  # tu- encoders: the timm model name with its tag, built with pretrained=True

    def describe(self) -> str:
        if self.repo_id:
            return f"{self.repo_id} ({' or '.join(self.filenames)}) in the Hugging Face cache {hf_constants.HF_HUB_CACHE}"
        return f"{_url_file(self.url)} in the torch hub cache {_torch_checkpoints_dir()}"

    def fetch_hint(self) -> str:
        if self.repo_id:
            revision = f" --revision {self.revision}" if self.revision else ""
            extra = f" {SMP_CONFIG_FILE}" if not self.timm_name else ""
            return (f"on a machine with internet run `hf download {self.repo_id} {self.filenames[0]}{extra}{revision}` "
                    f"and copy ~/.cache/huggingface/hub/{repo_folder_name(repo_id=self.repo_id, repo_type='model')} "
                    f"into {hf_constants.HF_HUB_CACHE}")
        return f"on a machine with internet download {self.url} and copy it into {_torch_checkpoints_dir()}"


def weights_source(backbone: str, encoder_weights) -> WeightsSource:
    """The source of a (checked) backbone's encoder_weights; UserError listing the valid names when
    smp/timm has none such."""
    if not isinstance(encoder_weights, str):
        raise UserError(f"encoder_weights must be null or a name such as {IMAGENET}, got {encoder_weights!r}")
    return _weights_source(backbone, encoder_weights)


@functools.lru_cache(maxsize=None)
def _weights_source(backbone: str, weights: str) -> WeightsSource:
    if backbone.startswith(TIMM_PREFIX):
        return _timm_weights_source(backbone, weights)
    settings = smp.encoders.encoders[backbone]["pretrained_settings"]
    if weights not in settings:
        raise UserError(f"backbone {backbone} has no encoder_weights {weights!r}; valid: {', '.join(settings)} or null")
    return WeightsSource(backbone, weights, repo_id=settings[weights]["repo_id"],
                         revision=settings[weights]["revision"], filenames=("model.safetensors",))


@functools.lru_cache(maxsize=None)
def timm_tags(arch: str) -> tuple[str, ...]:
    """The pretrained tags of a timm architecture that come with weights, default first."""
    names = timm.models.get_arch_pretrained_cfgs(arch)
    return tuple(name.split(".", 1)[1] for name in names if timm.models.is_model_pretrained(name))


def _timm_weights_source(backbone: str, weights: str) -> WeightsSource:
    arch, tag = timm.models.split_model_name_tag(backbone[len(TIMM_PREFIX):])
    tags = timm_tags(arch)
    if not tags:
        raise UserError(f"timm has no pretrained weights for {arch}; set encoder_weights: null")
    if weights != IMAGENET and (weights not in tags or tag and weights != tag):
        valid = [tag] if tag else list(tags)
        raise UserError(f"backbone {backbone} has no encoder_weights {weights!r}; valid: {IMAGENET} "
                        f"(timm's tag {tag or tags[0]}), {', '.join(valid)} or null")
    timm_name = f"{arch}.{tag or (tags[0] if weights == IMAGENET else weights)}"
    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        filenames = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
        return WeightsSource(backbone, weights, repo_id=repo_id, revision=revision or None, filenames=filenames,
                             timm_name=timm_name)
    if cfg.url:
        return WeightsSource(backbone, weights, url=cfg.url, timm_name=timm_name)
    raise UserError(f"timm has no downloadable weights for {timm_name}; set encoder_weights: null")


# ---------------------------------------------------------------------------------------------- files

def cached_file(source: WeightsSource) -> Path | None:
    """The weights file if the cache holds it (nothing is downloaded)."""
    if not source.repo_id:
        path = _torch_checkpoints_dir() / _url_file(source.url)
        return path if path.is_file() else None
    for filename in source.filenames:
        found = _hub_cached(source, filename)
        if found is not None:
            return found
    return None


def weights_file(source: WeightsSource) -> Path:
    """The local weights file: from the cache, else downloaded if the hub answers, else a one-line UserError."""
    found = cached_file(source)
    if found is not None:
        return found
    if hf_constants.HF_HUB_OFFLINE:
        raise missing_weights(source, "HF_HUB_OFFLINE is set")
    host, port = _host_port(hf_constants.ENDPOINT if source.repo_id else source.url)
    if not _reachable(host, port):
        raise missing_weights(source, f"{host} cannot be reached")
    try:
        return _download(source)
    except (OSError, ValueError) as exc:  # HTTP errors of huggingface_hub and urllib are OSErrors
        raise missing_weights(source, f"download failed: {short_reason(exc)}") from exc


def hub_reachable() -> bool:
    """Whether the Hugging Face hub may be asked for a missing file (not offline, and it answers)."""
    return not hf_constants.HF_HUB_OFFLINE and _reachable(*_host_port(hf_constants.ENDPOINT))


def missing_weights(source: WeightsSource, why: str) -> UserError:
    return UserError(f"backbone {source.backbone} with encoder_weights {source.weights!r} needs {source.describe()}, "
                     f"which lacks it and cannot download it ({why}); {source.fetch_hint()}, "
                     "or set encoder_weights: null")


def _hub_cached(source: WeightsSource, filename: str) -> Path | None:
    found = try_to_load_from_cache(source.repo_id, filename, revision=source.revision)
    return Path(found) if isinstance(found, str) else None


def _download(source: WeightsSource) -> Path:
    if not source.repo_id:
        path = _torch_checkpoints_dir() / _url_file(source.url)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(source.url, str(path), progress=False)
        return path
    if not source.timm_name:  # smp-hub: its preprocessing comes with the weights (encoder_normalization)
        _download_optional(source, SMP_CONFIG_FILE)
    for filename in source.filenames[:-1]:
        try:
            return Path(hf_hub_download(source.repo_id, filename, revision=source.revision))
        except RemoteEntryNotFoundError:
            continue
    return Path(hf_hub_download(source.repo_id, source.filenames[-1], revision=source.revision))


def _download_optional(source: WeightsSource, filename: str) -> None:
    try:
        hf_hub_download(source.repo_id, filename, revision=source.revision)
    except (RemoteEntryNotFoundError, LocalEntryNotFoundError):
        pass


def _torch_checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _url_file(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def _host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "", parsed.port or (80 if parsed.scheme == "http" else 443)


def _reachable(host: str, port: int) -> bool:
    """A quick TCP probe, so a machine without network fails in seconds instead of huggingface_hub's retries.
    Behind a proxy the probe proves nothing, so the download is left to try."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True
    try:
        socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- normalisation

def encoder_normalization(backbone: str, encoder_weights: str | None) -> dict:
    """{"mean", "std"} (per RGB channel, for [0, 1] pixels) that the encoder's weights were trained with:
    timm's pretrained_cfg for tu- encoders, the smp-hub repo's config.json (as smp's
    get_preprocessing_params reads it) for smp encoders. Random-init encoders (encoder_weights None)
    and smp weights cached without their config.json get DEFAULT_NORMALIZATION."""
    if encoder_weights is None:
        return DEFAULT_NORMALIZATION
    source = weights_source(backbone, encoder_weights)
    if source.timm_name:
        cfg = timm.models.get_pretrained_cfg(source.timm_name)
        return {"mean": list(cfg.mean), "std": list(cfg.std)}
    config = _hub_cached(source, SMP_CONFIG_FILE)
    if config is None:
        return DEFAULT_NORMALIZATION
    settings = json.loads(config.read_text())
    return {"mean": list(settings["mean"]), "std": list(settings["std"])}
