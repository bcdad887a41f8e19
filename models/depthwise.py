"""Depthwise convolutions that train in bf16 on the CPU without oneDNN's slow bf16 backward kernels.

Under CPU bf16 autocast, oneDNN runs the forward pass of a depthwise convolution about twice as fast
as in float32, but its bf16 backward kernels are up to 20x slower than the float32 ones (the input
gradient of strided convolutions, the weight gradient of 5x5 kernels; bench/README.md). EfficientNet
and MobileNet encoders are built of such convolutions: their backward passes took half of a
Unet-EfficientNet-Lite0 training step. `float32_depthwise_backward(model)` keeps their forward pass
as autocast runs it and computes their gradients in float32.

The model's modules keep their class's behaviour (timm's dynamic "same" padding included) and their
parameters: each depthwise convolution becomes an instance of a subclass of its own class, whose
forward pass hands its `conv2d` call to `_Conv2dFloat32Backward`. state_dicts are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode


class _Conv2dFloat32Backward(torch.autograd.Function):
    """F.conv2d as autocast computes it; its gradients computed in float32, returned in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.geometry = (_pair(stride), _pair(padding), _pair(dilation), groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad.float(), x.float(), weight.float(), [weight.shape[0]] if ctx.has_bias else None,
            stride, padding, dilation, False, [0, 0], groups, wanted)
        return (_cast(grad_x, x), _cast(grad_weight, weight), _cast(grad_bias, weight), None, None, None, None)


def _cast(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)


class _Float32BackwardConv2d(TorchFunctionMode):
    """Routes the positional F.conv2d call of a convolution module's forward pass (nn.Conv2d's, timm's
    Conv2dSame's) through _Conv2dFloat32Backward; every other call runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.conv2d and not kwargs and len(args) == 7 and not isinstance(args[4], str):
            return _Conv2dFloat32Backward.apply(*args)
        return func(*args, **(kwargs or {}))


_SUBCLASSES: dict[type, type] = {}


def _float32_backward_class(cls: type) -> type:
    """The subclass of a convolution class whose forward pass runs under _Float32BackwardConv2d when
    CPU autocast is on (made once per class)."""
    if cls not in _SUBCLASSES:
        def forward(self, x):
            if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or not torch.is_grad_enabled():
                return cls.forward(self, x)
            with _Float32BackwardConv2d():
                return cls.forward(self, x)

        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return _SUBCLASSES[cls]


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def float32_depthwise_backward(model: nn.Module) -> nn.Module:
    """model, its depthwise convolutions computing their gradients in float32 under CPU autocast."""
    for module in model.modules():
        if is_depthwise(module) and type(module) not in _SUBCLASSES.values():
            module.__class__ = _float32_backward_class(type(module))
    return model
