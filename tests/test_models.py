"""Checkpoints and inference on real (tiny, random-init) smp models (the factory: tests/test_factory.py)."""
import json

import pytest
import torch

from models.checkpoint import META_FILE, WEIGHTS_FILE, load_checkpoint, save_checkpoint
from models.factory import build_model
from models.inference import normalize, predict_batch, predict_probs


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
