"""Model factory over segmentation-models-pytorch (smp): every decoder x encoder smp can build, timm
encoders through `tu-<timm model>[.<pretrained tag>]`.

Validation (before Ray starts, cheap, no weights touched): `check_decoder`, `check_backbone`,
`check_pair` (builds the pair on the meta device, so no real weights are allocated or initialised) and
`check_weights` (the encoder_weights NAME). `build_model` builds one model for a trial; with
`encoder_weights` it loads the pretrained encoder from the file models.weights finds (the local Hugging
Face / torch hub cache, a download only when the hub is reachable, else a one-line error naming the file
and where it belongs). It never falls back to random weights. `input_normalization` is the mean/std
the encoder's weights expect.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from pathlib import Path

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from checks import did_you_mean
from errors import UserError, short_reason

from .open_set import with_known_class_head
from .weights import (TIMM_PREFIX, WeightsSource, cached_file, encoder_normalization, timm_tags, weights_file,
                      weights_source)

# Decoder names as smp spells them, looked up case-insensitively: {"unet": "Unet", ...}.
DECODERS: dict[str, str] = {key: arch.__name__ for key, arch in smp.MODEL_ARCHITECTURES_MAPPING.items()}
# smp's own encoders (name -> {"encoder", "pretrained_settings", "params"}); timm encoders come on top via tu-.
SMP_ENCODERS: dict[str, dict] = smp.encoders.encoders
BACKBONES: tuple[str, ...] = tuple(SMP_ENCODERS)
_BACKBONE_KEYS = {name.lower(): name for name in BACKBONES}


# What smp and timm raise for a pair they cannot build (a bug in this module would raise something else).
_BUILD_ERRORS = (ValueError, TypeError, KeyError, AssertionError, RuntimeError, NotImplementedError, IndexError)


# ---------------------------------------------------------------------------------------------- names

def _closest(name, options, prefix: str = "") -> str:
    return did_you_mean(name, options, count=3, cutoff=0.5, prefix=prefix, quote=False)


def check_decoder(name: str) -> str:
    """Returns the decoder name as smp spells it (any case accepted) or raises UserError with close matches."""
    key = str(name).lower()
    if key not in DECODERS:
        raise UserError(f"unknown decoder {name!r}{_closest(name, DECODERS.values())}; "
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
    if tag and tag not in timm_tags(arch):
        tags = ", ".join(timm_tags(arch)) or "none"
        raise UserError(f"timm model {arch} has no pretrained tag {tag!r}; tags: {tags}")


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
            return short_reason(exc)
        try:  # a few encoders need real tensors while building (mit_b*: Tensor.item()); build those for real
            _probe(decoder, backbone, input_size, "cpu")
        except _BUILD_ERRORS as cpu_exc:
            return short_reason(cpu_exc)
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

def check_weights(backbone: str, encoder_weights: str | None) -> None:
    """Checks the NAME of encoder_weights for the backbone (the file is checked when a trial builds)."""
    if encoder_weights is not None:
        weights_source(check_backbone(backbone), encoder_weights)


def cached_weights(backbone: str, encoder_weights: str) -> tuple[Path | None, str]:
    """(the cached file, or None; what is needed and how to get it when it is missing), for --dry-run."""
    source = weights_source(check_backbone(backbone), encoder_weights)
    found = cached_file(source)
    return found, "" if found else f"needs {source.describe()}; {source.fetch_hint()}"


def input_normalization(backbone: str, encoder_weights: str | None) -> dict:
    """{"mean", "std"} the model's input is normalised with: those its encoder's weights were trained
    with (models.weights.encoder_normalization)."""
    return encoder_normalization(check_backbone(backbone), encoder_weights)


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
    except (*_BUILD_ERRORS, OSError, SafetensorError) as exc:  # a file that is not what its name says
        raise UserError(f"cannot load {path} as encoder_weights {source.weights!r} of backbone {backbone}: "
                        f"{short_reason(exc)}") from exc


def _pretrained_model(decoder: str, source: WeightsSource, path: Path, num_classes: int) -> nn.Module:
    if source.timm_name:  # timm loads (and adapts) its own checkpoint; point it at the local file
        return _create(decoder, TIMM_PREFIX + source.timm_name, num_classes, encoder_weights=True,
                       pretrained_cfg_overlay={"file": str(path), "source": None})
    model = _create(decoder, source.backbone, num_classes)
    model.encoder.load_state_dict(load_file(path, device="cpu"))  # as smp's get_encoder does
    return model
