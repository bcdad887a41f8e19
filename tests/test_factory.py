"""Model factory on the real smp 0.6.0 / timm: names, decoder x backbone pairs, pretrained weights.

Everything is tiny (3 classes, 64 px inputs, small encoders). Pretrained files cannot be downloaded here,
so the weight tests write files where huggingface_hub / torch.hub keep downloaded ones, in temporary caches.
"""
import time

import huggingface_hub
import pytest
import segmentation_models_pytorch as smp
import timm
import torch

from errors import UserError
from models.factory import (BACKBONES, DECODERS, build_model, check_backbone, check_decoder, check_pair,
                            check_weights)

from .conftest import SMP_RESNET18_REVISION, put_in_hf_cache, use_hub_cache

# Two small smp encoders for every decoder, except DPT, which takes only ViT-style timm encoders: timm's
# tiny test ViTs (0.4M parameters) stand in there.
BACKBONES_FOR = {"DPT": ("tu-test_vit", "tu-test_vit2")}
SMALL_BACKBONES = ("resnet18", "mobilenet_v2")
# PAN's feature pyramid attention pools the stride-16 features three more times: 64 px is too small.
INPUT_SIZE_FOR = {"PAN": 128}


def test_the_registry_is_every_smp_architecture_under_its_smp_name():
    assert sorted(DECODERS.values()) == sorted(arch.__name__ for arch in smp.MODEL_ARCHITECTURES_MAPPING.values())
    assert set(BACKBONES) == set(smp.encoders.get_encoder_names())


@pytest.mark.parametrize("decoder", list(DECODERS.values()))
def test_every_decoder_builds_and_trains_a_step_with_two_small_backbones(decoder):
    size = INPUT_SIZE_FOR.get(decoder, 64)
    for backbone in BACKBONES_FOR.get(decoder, SMALL_BACKBONES):
        torch.manual_seed(0)
        model = build_model(decoder, backbone, num_classes=3)
        # A batch of 2: BatchNorm after global pooling (DeepLabV3, PSPNet) needs more than one value per channel.
        out = model(torch.randn(2, 3, size, size))
        assert out.shape == (2, 3, size, size), (decoder, backbone)
        out.mean().backward()
        grads = [p.grad for p in model.encoder.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), (decoder, backbone)


def test_decoder_names_are_case_insensitive_and_unknown_ones_get_close_matches():
    assert check_decoder("deeplabv3plus") == "DeepLabV3Plus"
    assert check_decoder("UPERNET") == "UPerNet"
    with pytest.raises(UserError, match="unknown decoder 'Unett' \\(did you mean Unet"):
        check_decoder("Unett")


def test_backbone_names_smp_and_timm():
    assert check_backbone("ResNet18") == "resnet18"
    assert check_backbone("tu-resnet18") == "tu-resnet18"
    assert check_backbone("tu-resnet18.a1_in1k") == "tu-resnet18.a1_in1k"
    with pytest.raises(UserError, match="unknown backbone 'resnet-18' \\(did you mean resnet18"):
        check_backbone("resnet-18")
    with pytest.raises(UserError, match="unknown timm backbone 'tu-resnet-18' \\(did you mean tu-resnet18"):
        check_backbone("tu-resnet-18")
    with pytest.raises(UserError, match="timm model resnet18 has no pretrained tag 'in22k'; tags: a1_in1k"):
        check_backbone("tu-resnet18.in22k")
    with pytest.raises(UserError, match="deprecated smp alias .* use 'tu-regnetx_002'"):
        check_backbone("timm-regnetx_002")


def test_check_pair_rejects_what_smp_cannot_build_and_says_what_works():
    with pytest.raises(UserError) as info:
        check_pair("DeepLabV3", "inceptionresnetv2")  # a pair of search_spaces/full.yaml
    message = str(info.value)
    assert message.startswith("smp cannot build DeepLabV3 with backbone inceptionresnetv2: InceptionResnetV2 encoder "
                              "does not support dilated mode")
    assert "DeepLabV3 needs an encoder that can be dilated to output stride 8" in message
    assert "inceptionresnetv2 works with Unet, UnetPlusPlus" in message and "\n" not in message
    with pytest.raises(UserError, match="smp cannot build DPT with backbone resnet18: Only Timm encoders"):
        check_pair("dpt", "resnet18")
    with pytest.raises(UserError, match="unknown backbone"):
        check_pair("Unet", "resnet-18")
    for decoder, backbone in [("Unet", "resnet18"), ("Segformer", "mit_b0"), ("DPT", "tu-test_vit"),
                              ("UPerNet", "tu-test_convnext"), ("DeepLabV3Plus", "timm-efficientnet-b0")]:
        check_pair(decoder, backbone)


@pytest.mark.parametrize("decoder,backbone", [
    ("Unet", "mobilenet_v2"), ("DeepLabV3", "densenet121"), ("UnetPlusPlus", "mit_b0"), ("Segformer", "mit_b0"),
    ("DPT", "resnet18"), ("FPN", "tu-test_vit"), ("DPT", "tu-test_vit"), ("PAN", "tu-test_efficientnet"),
])
def test_check_pair_on_the_meta_device_agrees_with_a_real_build(decoder, backbone):
    try:
        smp.create_model(decoder, encoder_name=backbone, encoder_weights=None, classes=2)
        smp_builds = True
    except (ValueError, TypeError, AssertionError, RuntimeError):
        smp_builds = False
    try:
        check_pair(decoder, backbone)
        checked = True
    except UserError:
        checked = False
    assert checked == smp_builds, (decoder, backbone)


def test_check_pair_with_an_input_size_runs_a_meta_forward_that_agrees_with_a_real_one():
    model = smp.create_model("PAN", encoder_name="resnet18", encoder_weights=None, classes=2).eval()
    with pytest.raises(RuntimeError, match="Output size is too small"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(UserError, match="smp cannot build PAN with backbone resnet18: .*Output size is too small"):
        check_pair("PAN", "resnet18", input_size=64)
    check_pair("PAN", "resnet18", input_size=128)
    assert model(torch.randn(2, 3, 128, 128)).shape == (2, 2, 128, 128)


def test_check_pair_allocates_no_weights():
    # resnext101_32x48d has 829M parameters: a real build would take many seconds and 3 GB; meta takes a blink.
    start = time.perf_counter()
    check_pair("UnetPlusPlus", "resnext101_32x48d")
    assert time.perf_counter() - start < 15


# ---------------------------------------------------------------------------------------------- weights

@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches, no network; yields the Hugging Face hub cache folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    use_hub_cache(monkeypatch, tmp_path / "hf" / "hub")
    return tmp_path / "hf" / "hub"


def test_missing_pretrained_weights_are_a_clear_error_not_random_init(empty_caches):
    with pytest.raises(UserError) as info:
        build_model("Unet", "resnet18", 3, encoder_weights="imagenet")
    message = str(info.value)
    assert message.startswith("backbone resnet18 with encoder_weights 'imagenet' needs smp-hub/resnet18.imagenet "
                              f"(model.safetensors) in the Hugging Face cache {empty_caches}, which lacks it")
    assert "(HF_HUB_OFFLINE is set)" in message
    assert (f"`hf download smp-hub/resnet18.imagenet model.safetensors config.json --revision {SMP_RESNET18_REVISION}` "
            "and copy "
            f"~/.cache/huggingface/hub/models--smp-hub--resnet18.imagenet into {empty_caches}") in message
    assert message.endswith("or set encoder_weights: null") and "\n" not in message
    with pytest.raises(UserError, match="needs timm/test_resnet.r160_in1k \\(model.safetensors or pytorch_model"):
        build_model("FPN", "tu-test_resnet", 3, encoder_weights="imagenet")
    with pytest.raises(UserError, match="needs seresnet18-4bb0ce65.pth in the torch hub cache .*torch/hub/checkpoints"):
        build_model("FPN", "tu-legacy_seresnet18", 3, encoder_weights="imagenet")


def test_an_unreachable_hub_fails_in_seconds_not_after_retries(empty_caches, monkeypatch):
    use_hub_cache(monkeypatch, empty_caches, offline=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    with pytest.raises(UserError, match="cannot download it \\(127.0.0.1 cannot be reached\\)"):
        build_model("Unet", "resnet18", 3, encoder_weights="imagenet")
    assert time.perf_counter() - start < 10


def test_cached_smp_weights_are_loaded(empty_caches):
    torch.manual_seed(1)
    pretrained = smp.encoders.get_encoder("resnet18").state_dict()
    put_in_hf_cache(empty_caches, "smp-hub/resnet18.imagenet", "model.safetensors", pretrained, SMP_RESNET18_REVISION)
    torch.manual_seed(2)
    model = build_model("Unet", "resnet18", 3, encoder_weights="imagenet")
    loaded = model.encoder.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in pretrained.items())


def test_cached_timm_weights_are_loaded_from_the_hub_cache_and_the_torch_hub_cache(empty_caches, tmp_path):
    torch.manual_seed(1)
    pretrained = timm.create_model("test_resnet").state_dict()
    put_in_hf_cache(empty_caches, "timm/test_resnet.r160_in1k", "model.safetensors", pretrained)
    model = build_model("FPN", "tu-test_resnet", 3, encoder_weights="r160_in1k")
    loaded = model.encoder.model.state_dict()
    assert loaded and all(torch.equal(value, pretrained[key]) for key, value in loaded.items())

    legacy = timm.create_model("legacy_seresnet18").state_dict()
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(legacy, tmp_path / "torch" / "hub" / "checkpoints" / "seresnet18-4bb0ce65.pth")
    model = build_model("Unet", "tu-legacy_seresnet18", 3, encoder_weights="imagenet")
    loaded = model.encoder.model.state_dict()
    assert loaded and all(torch.equal(value, legacy[key]) for key, value in loaded.items())


def test_a_cached_file_that_does_not_fit_is_an_error_not_random_init(empty_caches):
    wrong = smp.encoders.get_encoder("resnet34").state_dict()
    put_in_hf_cache(empty_caches, "smp-hub/resnet18.imagenet", "model.safetensors", wrong, SMP_RESNET18_REVISION)
    with pytest.raises(UserError, match="cannot load .*model.safetensors as encoder_weights 'imagenet' of backbone "
                                        "resnet18: Error\\(s\\) in loading state_dict"):
        build_model("Unet", "resnet18", 3, encoder_weights="imagenet")


def test_a_truncated_cached_file_is_an_error_naming_it(empty_caches):
    put_in_hf_cache(empty_caches, "smp-hub/resnet18.imagenet", "model.safetensors", b"truncated", SMP_RESNET18_REVISION)
    with pytest.raises(UserError, match="cannot load .*model.safetensors as encoder_weights 'imagenet' of backbone "
                                        "resnet18: .*header"):
        build_model("Unet", "resnet18", 3, encoder_weights="imagenet")


def test_check_weights_validates_the_name_against_smp_and_timm():
    for backbone, weights in [("resnet18", None), ("resnet18", "imagenet"), ("resnet18", "swsl"),
                              ("timm-efficientnet-b3", "noisy-student"), ("tu-resnet18", "imagenet"),
                              ("tu-resnet18", "a1_in1k"), ("tu-resnet18.a1_in1k", "a1_in1k")]:
        check_weights(backbone, weights)
    with pytest.raises(UserError, match="backbone resnet18 has no encoder_weights 'imagenet21k'; "
                                        "valid: imagenet, ssl, swsl or null$"):
        check_weights("resnet18", "imagenet21k")
    with pytest.raises(UserError, match="backbone tu-test_resnet has no encoder_weights 'in22k'; "
                                        "valid: imagenet \\(timm's tag r160_in1k\\), r160_in1k or null$"):
        check_weights("tu-test_resnet", "in22k")
    with pytest.raises(UserError, match="valid: imagenet \\(timm's tag a1_in1k\\), a1_in1k or null$"):
        check_weights("tu-resnet18.a1_in1k", "tv_in1k")
    with pytest.raises(UserError, match="encoder_weights must be null or a name"):
        check_weights("resnet18", True)
