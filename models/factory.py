"""Model factory over segmentation-models-pytorch (decoders x encoders, timm encoders via `tu-`)."""
from __future__ import annotations

import difflib

import segmentation_models_pytorch as smp
import torch.nn as nn

from errors import UserError

DECODERS: dict[str, str] = {name.lower(): name for name in (
    "Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "PAN",
    "UPerNet", "Segformer", "DPT",
) if name.lower() in smp.MODEL_ARCHITECTURES_MAPPING}

# ImageNet statistics: what every smp/timm encoder was pretrained with, and harmless for random init.
NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _closest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def check_decoder(name: str) -> str:
    """Returns the canonical decoder name or raises UserError naming the closest valid ones."""
    if str(name).lower() not in DECODERS:
        raise UserError(f"unknown decoder {name!r}{_closest(str(name), DECODERS.values())}; "
                        f"valid: {', '.join(DECODERS.values())}")
    return DECODERS[str(name).lower()]


def check_backbone(name: str) -> str:
    if str(name).startswith("tu-"):
        import timm

        if not timm.list_models(name[3:]):
            raise UserError(f"unknown timm backbone {name!r}{_closest(name[3:], timm.list_models())}")
        return name
    encoders = smp.encoders.get_encoder_names()
    if name not in encoders:
        raise UserError(f"unknown backbone {name!r}{_closest(str(name), encoders)}; "
                        "use an smp encoder name or 'tu-<timm model>'")
    return name


def build_model(decoder: str, backbone: str, num_classes: int, encoder_weights: str | None = None) -> nn.Module:
    """Builds decoder(backbone) with num_classes outputs; random init unless encoder_weights is named.

    Pretrained weights are loaded from the local torch / Hugging Face cache; when they are missing
    and cannot be downloaded, the error says so instead of silently training from scratch.
    """
    decoder, backbone = check_decoder(decoder), check_backbone(backbone)
    try:
        return smp.create_model(decoder, encoder_name=backbone, encoder_weights=encoder_weights,
                                in_channels=3, classes=num_classes)
    except (OSError, ConnectionError, RuntimeError) as exc:
        if encoder_weights is None:
            raise
        raise UserError(
            f"cannot load {encoder_weights!r} weights for backbone {backbone!r}: {exc}. Without internet, "
            "copy the weight file into the torch hub cache (~/.cache/torch/hub/checkpoints) or the "
            "Hugging Face cache (~/.cache/huggingface) on this machine, or set encoder_weights: null"
        ) from exc
    except (KeyError, ValueError, AssertionError) as exc:
        raise UserError(f"smp cannot build {decoder} with backbone {backbone!r}: {exc}") from exc
