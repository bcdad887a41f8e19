"""Model factory over segmentation-models-pytorch (smp): every decoder x encoder smp can build, timm
encoders through `tu-<timm model>[.<pretrained tag>]`.

Validation (before Ray starts, cheap, no weights touched): `check_decoder`, `check_backbone`,
`check_pair` (builds the pair on the meta device, so no real weights are allocated or initialised) and
`check_weights` (the encoder_weights NAME). `build_model` builds one model for a trial; with
`encoder_weights` it loads the pretrained file from the local Hugging Face / torch hub cache, downloads it
only when the hub is reachable, and otherwise fails with a one-line error naming the file and where it
belongs. It never falls back to random weights.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import os
import socket
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from errors import UserError

from .open_set import with_known_class_head

TIMM_PREFIX = "tu-"
IMAGENET = "imagenet"  # for tu- encoders: timm's default pretrained tag of the model

# Decoder names as smp spells them, looked up case-insensitively: {"unet": "Unet", ...}.
DECODERS: dict[str, str] = {key: arch.__name__ for key, arch in smp.MODEL_ARCHITECTURES_MAPPING.items()}
# smp's own encoders (name -> {"encoder", "pretrained_settings", "params"}); timm encoders come on top via tu-.
SMP_ENCODERS: dict[str, dict] = smp.encoders.encoders
BACKBONES: tuple[str, ...] = tuple(SMP_ENCODERS)
_BACKBONE_KEYS = {name.lower(): name for name in BACKBONES}

# ImageNet statistics: what every smp/timm encoder was pretrained with, and harmless for random init.
NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

# What smp and timm raise for a pair they cannot build (a bug in this module would raise something else).
_BUILD_ERRORS = (ValueError, TypeError, KeyError, AssertionError, RuntimeError, NotImplementedError, IndexError)
_PROBE_TIMEOUT_S = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


# ---------------------------------------------------------------------------------------------- names

def _closest(name: str, options, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""


def check_decoder(name: str) -> str:
    """Returns the decoder name as smp spells it (any case accepted) or raises UserError with close matches."""
    key = str(name).lower()
    if key not in DECODERS:
        raise UserError(f"unknown decoder {name!r}{_closest(str(name), DECODERS.values())}; "
                        f"valid: {', '.join(DECODERS.values())}")
    return DECODERS[key]


def check_backbone(name: str) -> str:
    """Returns the backbone name (an smp encoder, any case, or `tu-<timm model>[.<tag>]`) or raises UserError."""
    name = str(name)
    if name.startswith(TIMM_PREFIX):
        _check_timm_model(name[len(TIMM_PREFIX):])
        return name
    if name.lower() in _BACKBONE_KEYS:
        return _BACKBONE_KEYS[name.lower()]
    if smp.encoders.is_equivalent_to_timm_universal(name):
        raise UserError(f"backbone {name!r} is a deprecated smp alias of a timm model; use "
                        f"'{TIMM_PREFIX}{name.removeprefix('timm-')}' instead")
    raise UserError(f"unknown backbone {name!r}{_closest(name, BACKBONES)}; "
                    f"use an smp encoder name or '{TIMM_PREFIX}<timm model>'")


def _check_timm_model(model: str) -> None:
    arch, tag = timm.models.split_model_name_tag(model)
    if not timm.is_model(arch):
        raise UserError(f"unknown timm backbone {TIMM_PREFIX + model!r}"
                        f"{_closest(arch, timm.list_models(), TIMM_PREFIX)}")
    if tag and tag not in _timm_tags(arch):
        tags = ", ".join(_timm_tags(arch)) or "none"
        raise UserError(f"timm model {arch} has no pretrained tag {tag!r}; tags: {tags}")


@functools.lru_cache(maxsize=None)
def _timm_tags(arch: str) -> tuple[str, ...]:
    """The pretrained tags of a timm architecture that come with weights, default first."""
    names = timm.models.get_arch_pretrained_cfgs(arch)
    return tuple(name.split(".", 1)[1] for name in names if timm.models.is_model_pretrained(name))


# ---------------------------------------------------------------------------------------------- pairs

def check_pair(decoder: str, backbone: str, input_size: int | None = None) -> None:
    """Raises UserError when smp cannot build decoder(backbone) (depth, dilation, features_only, ...).

    Builds the pair on the meta device (no weights allocated or initialised; cached per process). With
    `input_size`, also runs a meta forward pass on a [2, 3, input_size, input_size] batch, which finds
    size limits (fixed-size ViTs, PAN's pooling) and pairs that only fail in forward.
    """
    decoder, backbone = check_decoder(decoder), check_backbone(backbone)
    problem = _pair_problem(decoder, backbone, input_size)
    if problem is None:
        return
    message = f"smp cannot build {decoder} with backbone {backbone}: {problem}"
    needs = _decoder_needs(decoder)
    works = [d for d in DECODERS.values() if d != decoder and _pair_problem(d, backbone, input_size) is None]
    raise UserError(message + (f"; {decoder} needs {needs}" if needs else "")
                    + (f"; {backbone} works with {', '.join(works)}" if works else ""))


@functools.lru_cache(maxsize=None)
def _pair_problem(decoder: str, backbone: str, input_size: int | None) -> str | None:
    """The short reason smp/timm give for not building (or running) the pair, or None when it works."""
    try:
        _probe(decoder, backbone, input_size, "meta")
    except _BUILD_ERRORS as exc:
        if not _is_meta_limitation(exc):
            return _short_reason(exc)
        try:  # a few encoders need real tensors while building (mit_b*: Tensor.item()); build those for real
            _probe(decoder, backbone, input_size, "cpu")
        except _BUILD_ERRORS as cpu_exc:
            return _short_reason(cpu_exc)
    return None


def _probe(decoder: str, backbone: str, input_size: int | None, device: str) -> None:
    on_device = _ShapedTensorsOnMeta() if device == "meta" else torch.device(device)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        with on_device:
            model = _create(decoder, backbone, classes=2)
        if input_size:
            with torch.device(device):
                model.eval()(torch.empty(2, 3, input_size, input_size))


class _ShapedTensorsOnMeta(TorchFunctionMode):
    """Like `with torch.device("meta")` (tensors get a shape but no memory), except for tensors made from
    values (torch.tensor, linspace, arange), which encoders may read back while building (mit_b*: .item()).
    In-place methods on meta tensors (weight initialisation: normal_, uniform_, zero_, ...) are skipped:
    they have nothing to fill, and their meta versions are slow."""

    FACTORIES = frozenset({torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.eye,
                           torch.rand, torch.randn, torch.randint, torch.randperm})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        elif _is_inplace_on_meta(func, args):
            return args[0]
        return func(*args, **kwargs)


def _is_inplace_on_meta(func, args) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.startswith("__") and bool(args)
            and isinstance(args[0], torch.Tensor) and args[0].is_meta)


def _is_meta_limitation(exc: Exception) -> bool:
    return "meta" in str(exc).lower()


def _short_reason(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if lines:
        return lines[0] if len(lines[0]) <= 200 else lines[0][:197] + "..."
    where = traceback.extract_tb(exc.__traceback__)[-1]
    package_path = Path(where.filename).parts[-3:]
    return f"{type(exc).__name__} at {'/'.join(package_path)}:{where.lineno}"


@functools.lru_cache(maxsize=None)
def _decoder_needs(decoder: str) -> str:
    """What a decoder asks of its encoder that smp's error may not say: dilation, read from its smp signature."""
    parameters = inspect.signature(smp.MODEL_ARCHITECTURES_MAPPING[decoder.lower()]).parameters
    stride = parameters.get("encoder_output_stride")
    if stride is not None and stride.default in (8, 16):
        return f"an encoder that can be dilated to output stride {stride.default}"
    return ""


def _create(decoder: str, backbone: str, classes: int, encoder_weights=None, **kwargs) -> nn.Module:
    """smp.create_model with this project's settings (3 input channels, smp's default decoder options)."""
    extra = _encoder_kwargs(decoder, backbone)
    try:
        return smp.create_model(decoder, encoder_name=backbone, encoder_weights=encoder_weights,
                                in_channels=3, classes=classes, **extra, **kwargs)
    except TypeError as exc:
        if not extra or not any(key in str(exc) for key in extra):
            raise
    return smp.create_model(decoder, encoder_name=backbone, encoder_weights=encoder_weights,
                            in_channels=3, classes=classes, **kwargs)


def _encoder_kwargs(decoder: str, backbone: str) -> dict:
    """DPT takes fixed-size ViTs; smp's documented remedy is dynamic_img_size, so any multiple of the patch works."""
    if decoder != "DPT" or not backbone.startswith(TIMM_PREFIX):
        return {}
    cfg = timm.models.get_pretrained_cfg(backbone[len(TIMM_PREFIX):])
    return {"dynamic_img_size": True} if cfg is not None and cfg.fixed_input_size else {}


# ---------------------------------------------------------------------------------------------- weights

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
            return f"{self.repo_id} ({' or '.join(self.filenames)}) in the Hugging Face cache {_hf_cache_dir()}"
        return f"{_url_file(self.url)} in the torch hub cache {_torch_checkpoints_dir()}"

    def fetch_hint(self) -> str:
        if self.repo_id:
            revision = f" --revision {self.revision}" if self.revision else ""
            folder = "models--" + self.repo_id.replace("/", "--")
            return (f"on a machine with internet run `hf download {self.repo_id} {self.filenames[0]}{revision}` "
                    f"and copy ~/.cache/huggingface/hub/{folder} into {_hf_cache_dir()}")
        return f"on a machine with internet download {self.url} and copy it into {_torch_checkpoints_dir()}"


def check_weights(backbone: str, encoder_weights: str | None) -> None:
    """Checks the NAME of encoder_weights for the backbone (the file is checked when a trial builds)."""
    if encoder_weights is not None:
        weights_source(backbone, encoder_weights)


def weights_source(backbone: str, encoder_weights: str) -> WeightsSource:
    """The source of backbone's encoder_weights; UserError listing the valid names when smp/timm has none such."""
    if not isinstance(encoder_weights, str):
        raise UserError(f"encoder_weights must be null or a name such as {IMAGENET}, got {encoder_weights!r}")
    return _weights_source(check_backbone(backbone), encoder_weights)


@functools.lru_cache(maxsize=None)
def _weights_source(backbone: str, weights: str) -> WeightsSource:
    if backbone.startswith(TIMM_PREFIX):
        return _timm_weights_source(backbone, weights)
    settings = SMP_ENCODERS[backbone]["pretrained_settings"]
    if weights not in settings:
        raise UserError(f"backbone {backbone} has no encoder_weights {weights!r}; valid: {', '.join(settings)} or null")
    return WeightsSource(backbone, weights, repo_id=settings[weights]["repo_id"],
                         revision=settings[weights]["revision"], filenames=("model.safetensors",))


def _timm_weights_source(backbone: str, weights: str) -> WeightsSource:
    arch, tag = timm.models.split_model_name_tag(backbone[len(TIMM_PREFIX):])
    tags = _timm_tags(arch)
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


def weights_file(source: WeightsSource) -> Path:
    """The local weights file: from the cache, else downloaded if the hub answers, else a one-line UserError."""
    found = _cached_file(source)
    if found is not None:
        return found
    if _offline():
        raise _missing_weights(source, "HF_HUB_OFFLINE is set")
    host, port = _host_port(_hf_endpoint() if source.repo_id else source.url)
    if not _reachable(host, port):
        raise _missing_weights(source, f"{host} cannot be reached")
    try:
        return _download(source)
    except (OSError, ValueError) as exc:  # HTTP errors of huggingface_hub and urllib are OSErrors
        raise _missing_weights(source, f"download failed: {_short_reason(exc)}") from exc


def _missing_weights(source: WeightsSource, why: str) -> UserError:
    return UserError(f"backbone {source.backbone} with encoder_weights {source.weights!r} needs {source.describe()}, "
                     f"which lacks it and cannot download it ({why}); {source.fetch_hint()}, "
                     "or set encoder_weights: null")


def _cached_file(source: WeightsSource) -> Path | None:
    if not source.repo_id:
        path = _torch_checkpoints_dir() / _url_file(source.url)
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    for filename in source.filenames:
        found = try_to_load_from_cache(source.repo_id, filename, cache_dir=_hf_cache_dir(), revision=source.revision)
        if isinstance(found, str):
            return Path(found)
    return None


def _download(source: WeightsSource) -> Path:
    if not source.repo_id:
        path = _torch_checkpoints_dir() / _url_file(source.url)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(source.url, str(path), progress=False)
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    for filename in source.filenames[:-1]:
        try:
            return Path(hf_hub_download(source.repo_id, filename, revision=source.revision,
                                        cache_dir=_hf_cache_dir(), endpoint=_hf_endpoint()))
        except RemoteEntryNotFoundError:
            continue
    return Path(hf_hub_download(source.repo_id, source.filenames[-1], revision=source.revision,
                                cache_dir=_hf_cache_dir(), endpoint=_hf_endpoint()))


# Read at call time (huggingface_hub reads its settings once, at import), so a trial honours its environment.
def _hf_cache_dir() -> Path:
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(cache).expanduser()


def _hf_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _torch_checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _url_file(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


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


# ---------------------------------------------------------------------------------------------- building

def build_model(decoder: str, backbone: str, num_classes: int, encoder_weights: str | None = None,
                unknown_label: int | None = None) -> nn.Module:
    """Builds decoder(backbone) with num_classes outputs; random init when encoder_weights is None, else the
    pretrained encoder from the local cache (see weights_file) — never random weights instead.

    unknown_label: an open-set model (models.open_set): it scores the other classes only, and its
    output at unknown_label is a constant very low logit."""
    if unknown_label is None:
        return _build(decoder, backbone, num_classes, encoder_weights)
    return with_known_class_head(_build(decoder, backbone, num_classes - 1, encoder_weights), unknown_label)


def _build(decoder: str, backbone: str, num_classes: int, encoder_weights: str | None) -> nn.Module:
    decoder, backbone = check_decoder(decoder), check_backbone(backbone)
    check_pair(decoder, backbone)
    if encoder_weights is None:
        return _create(decoder, backbone, num_classes)
    source = weights_source(backbone, encoder_weights)
    path = weights_file(source)
    try:
        return _pretrained_model(decoder, source, path, num_classes)
    except (*_BUILD_ERRORS, OSError) as exc:
        raise UserError(f"cannot load {path} as encoder_weights {source.weights!r} of backbone {backbone}: "
                        f"{_short_reason(exc)}") from exc


def _pretrained_model(decoder: str, source: WeightsSource, path: Path, num_classes: int) -> nn.Module:
    if source.timm_name:  # timm loads (and adapts) its own checkpoint; point it at the local file
        return _create(decoder, TIMM_PREFIX + source.timm_name, num_classes, encoder_weights=True,
                       pretrained_cfg_overlay={"file": str(path), "source": None})
    from safetensors.torch import load_file

    model = _create(decoder, source.backbone, num_classes)
    model.encoder.load_state_dict(load_file(path, device="cpu"))  # as smp's get_encoder does
    return model
