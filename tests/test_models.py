"""Model factory, checkpoints and inference on real (tiny, random-init) smp models."""
import json
import os
import subprocess
import sys

import pytest
import torch

from errors import UserError
from models.checkpoint import META_FILE, WEIGHTS_FILE, load_checkpoint, save_checkpoint
from models.factory import build_model, check_backbone, check_decoder
from models.inference import normalize, predict_batch, predict_probs

from .conftest import ROOT


@pytest.mark.parametrize("decoder", ["Unet", "FPN", "DeepLabV3Plus"])
def test_decoders_build_and_train_a_step(decoder):
    torch.manual_seed(0)
    model = build_model(decoder, "resnet18", num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 5, 64, 64)
    out.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_unknown_names_suggest_close_ones():
    assert check_decoder("deeplabv3plus") == "DeepLabV3Plus"
    with pytest.raises(UserError, match="did you mean Unet"):
        check_decoder("Unett")
    with pytest.raises(UserError, match="did you mean resnet18"):
        check_backbone("resnet-18")
    assert check_backbone("tu-resnet18") == "tu-resnet18"


def test_missing_pretrained_weights_are_a_clear_error_not_random_init(tmp_path):
    # An empty cache and no network: the weights cannot be found, so building must fail. A fresh
    # interpreter, because huggingface_hub reads HF_HUB_OFFLINE when it is imported.
    code = ("from errors import UserError\nfrom models.factory import build_model\n"
            "try:\n    build_model('Unet', 'resnet18', 3, encoder_weights='imagenet')\n"
            "except UserError as exc:\n    print(exc)\nelse:\n    print('built')")
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert "cannot load 'imagenet' weights for backbone 'resnet18'" in result.stdout, result.stdout + result.stderr
    assert "Hugging Face cache" in result.stdout


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("FPN", "resnet18", num_classes=4).eval()
    meta = {"decoder": "FPN", "backbone": "resnet18", "num_classes": 4, "class_names": list("abcd"),
            "input_size": [64, 64], "epoch": 3, "metrics": {"val_miou": 0.5}}
    save_checkpoint(tmp_path, model, meta)
    assert {p.name for p in tmp_path.iterdir()} == {WEIGHTS_FILE, META_FILE}
    assert json.loads((tmp_path / META_FILE).read_text()) == meta
    torch.load(tmp_path / WEIGHTS_FILE, weights_only=True)  # a plain state_dict
    loaded, loaded_meta = load_checkpoint(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert loaded_meta == meta


def test_predict_probs_resizes_logits_to_the_target_size():
    model = build_model("Unet", "resnet18", num_classes=3)
    batches = [torch.randn(2, 3, 64, 64), (torch.randn(1, 3, 64, 64), "ignored")]
    out = list(predict_probs(model, batches, out_size=(96, 96)))
    assert [p.shape for p in out] == [(2, 3, 96, 96), (1, 3, 96, 96)]
    assert all(torch.allclose(p.sum(1), torch.ones(1)) for p in out)


@pytest.mark.parametrize("tta", ["flip", "flip+scales"])
def test_tta_probabilities_are_mirror_symmetric_and_normalised(tta):
    torch.manual_seed(0)
    model = build_model("FPN", "resnet18", num_classes=3)
    x = torch.randn(2, 3, 64, 96)
    probs = next(predict_probs(model, [x], out_size=(80, 80), tta=tta))
    mirrored = next(predict_probs(model, [x.flip(-1)], out_size=(80, 80), tta=tta))
    assert probs.shape == (2, 3, 80, 80)
    assert torch.allclose(probs.sum(1), torch.ones(1), atol=1e-5)
    assert torch.allclose(probs, mirrored.flip(-1), atol=1e-5)
    assert not torch.allclose(probs, next(predict_probs(model, [x], out_size=(80, 80))), atol=1e-4)


def test_unknown_tta_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown TTA mode 'rotate'"):
        next(predict_probs(build_model("Unet", "resnet18", 2), [torch.randn(1, 3, 32, 32)], tta="rotate"))


def test_uint8_batches_are_normalised_on_the_device_like_float_input():


    model = build_model("Unet", "resnet18", 3)
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)  # as loaders deliver them: HWC
    norm = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    chw = images.permute(0, 3, 1, 2).float()
    expected = (chw / 255 - torch.tensor(norm["mean"]).view(1, 3, 1, 1)) / torch.tensor(norm["std"]).view(1, 3, 1, 1)
    assert torch.allclose(normalize(images, norm), expected, atol=1e-5)
    assert torch.allclose(predict_batch(model, images, normalization=norm), predict_batch(model, expected), atol=1e-5)
    with pytest.raises(ValueError, match="uint8 images need the model's normalization"):
        predict_batch(model, images)
