"""Depthwise convolutions with float32 gradients under CPU bf16 autocast (models.depthwise): the same
forward pass, correct gradients, the same parameters and checkpoints, on real timm and smp modules."""
import copy

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn as nn
from timm.layers import Conv2dSame

from models.depthwise import float32_depthwise_backward, is_depthwise


def _autocast_grads(module: nn.Module, x: torch.Tensor):
    """(output, input gradient, parameter gradients) of module(x) under CPU bf16 autocast."""
    module.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out, x.grad, {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(8, 8, 5, stride=1, padding=2, groups=8, bias=False),
    lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=True),
    lambda: Conv2dSame(8, 8, 5, stride=2, groups=8, bias=False),  # timm's dynamic "same" padding (tf_ models)
], ids=["5x5", "strided-bias", "timm-same"])
def test_the_forward_pass_is_unchanged_and_the_gradients_are_float32_ones(make):
    torch.manual_seed(0)
    plain = make()
    fixed = float32_depthwise_backward(copy.deepcopy(plain))
    assert isinstance(fixed, type(plain)) and type(fixed) is not type(plain)
    x = torch.randn(2, 8, 13, 13).contiguous(memory_format=torch.channels_last)
    out_plain, _, _ = _autocast_grads(plain, x)
    out, grad_x, grads = _autocast_grads(fixed, x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, out_plain)
    # float64 gradients of the same convolution from the same (bf16) output gradient: the float32
    # backward pass is that close to them
    reference = copy.deepcopy(plain).double()
    x64 = x.double().requires_grad_()
    out64 = reference(x64)
    out64.backward(torch.linspace(-1, 1, out64.numel()).reshape(out64.shape).bfloat16().double())
    assert grad_x.dtype == torch.float32
    assert torch.allclose(grad_x.double(), x64.grad, rtol=1e-4, atol=1e-5)
    for name, p in reference.named_parameters():
        assert grads[name].dtype == torch.float32
        assert torch.allclose(grads[name].double(), p.grad, rtol=1e-4, atol=1e-4), name


def test_only_depthwise_convolutions_change_and_the_state_dict_and_copies_stay_the_same():
    model = smp.Unet("tu-tf_efficientnet_lite0", encoder_weights=None, classes=3)
    keys = list(model.state_dict())
    classes = {name: type(m) for name, m in model.named_modules()}
    float32_depthwise_backward(model)
    float32_depthwise_backward(model)  # a second call changes nothing more
    changed = {name for name, m in model.named_modules() if type(m) is not classes[name]}
    assert changed == {name for name, m in model.named_modules() if is_depthwise(m)} and len(changed) == 16
    assert all(type(m).__bases__ == (classes[name],) for name, m in model.named_modules() if name in changed)
    assert list(model.state_dict()) == keys
    fresh = smp.Unet("tu-tf_efficientnet_lite0", encoder_weights=None, classes=3)
    fresh.load_state_dict(model.state_dict())  # checkpoints load into models built without the change
    copied = copy.deepcopy(model)  # as SWA's AveragedModel copies it
    assert {type(m) for m in copied.modules()} == {type(m) for m in model.modules()}


def test_a_training_step_of_the_changed_model_matches_the_plain_one_in_float32():
    torch.manual_seed(0)
    plain = smp.Unet("tu-tf_efficientnet_lite0", encoder_weights=None, classes=3, encoder_depth=3,
                     decoder_channels=(16, 8, 8))
    fixed = float32_depthwise_backward(copy.deepcopy(plain))
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for model in (plain, fixed):  # no autocast: the float32 path is the plain one
        model.zero_grad()
        model(x).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0 and all(torch.equal(a, b) for a, b in zip(*grads))
