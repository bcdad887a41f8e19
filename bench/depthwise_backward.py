"""What computing depthwise convolutions' gradients in float32 (models.depthwise) buys under CPU bf16
autocast: training steps of one model with and without it, alternating rounds in one process, and
the three kernels of single depthwise convolutions of EfficientNet-Lite0's shapes in float32 and bf16.

    .venv/bin/python bench/depthwise_backward.py [--backbone tu-tf_efficientnet_lite0] [--size 160]
        [--batch 16] [--threads 1] [--rounds 4]

A training step is models.training.train_epoch over one synthetic batch (AdamW, cross-entropy,
channels-last, bf16 autocast): the trainable's loop. Needs a CPU that runs bf16 in hardware (AMX or
AVX512-BF16), where `amp: auto` trains in bf16. Last line: JSON with the median step of each side
and their ratio, and the kernel timings.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from models.factory import build_model
from models.losses import build_loss
from models.training import place_model, train_epoch
from models.weights import DEFAULT_NORMALIZATION

# (channels, input side, kernel, stride) of depthwise convolutions in EfficientNet-Lite0 at 160 px
KERNEL_CASES = [(96, 80, 3, 2), (144, 40, 5, 2), (144, 40, 5, 1), (480, 10, 5, 1), (240, 20, 3, 1)]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tu-tf_efficientnet_lite0")
    parser.add_argument("--decoder", default="Unet")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side and round")
    return parser.parse_args()


def _ms(fn, repeats: int = 3) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) * 1000 / repeats


def kernel_times(channels: int, side: int, kernel: int, stride: int) -> dict:
    """Forward, input-gradient and weight-gradient ms of one depthwise convolution (batch 16,
    channels-last) in float32 and in bf16."""
    times = {}
    for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(16, channels, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(channels, 1, kernel, kernel, dtype=dtype).contiguous(memory_format=torch.channels_last)
        geometry = ([stride, stride], [kernel // 2, kernel // 2], [1, 1], False, [0, 0], channels)
        grad = torch.ones_like(F.conv2d(x, w, None, stride, kernel // 2, 1, channels))

        def backward(mask):
            return lambda: torch.ops.aten.convolution_backward(grad, x, w, None, *geometry, mask)

        times[name] = {"forward_ms": round(_ms(lambda: F.conv2d(x, w, None, stride, kernel // 2, 1, channels)), 1),
                       "input_grad_ms": round(_ms(backward([True, False, False])), 1),
                       "weight_grad_ms": round(_ms(backward([False, True, False])), 1)}
    return {"channels": channels, "side": side, "kernel": kernel, "stride": stride, **times}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    classes = 13
    plain = build_model(args.decoder, args.backbone, classes).to(memory_format=torch.channels_last)
    fixed = place_model(copy.deepcopy(plain), "cpu", channels_last=True)  # place_model applies models.depthwise
    images = torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8)
    masks = torch.randint(0, classes, (args.batch, args.size, args.size), dtype=torch.uint8)
    batches = [(images, masks)] * args.steps
    loss_fn = build_loss({"loss": "ce"})
    sides = {"bf16": plain, "bf16, depthwise gradients in float32": fixed}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-3) for name, model in sides.items()}

    def steps(name: str) -> float:
        started = time.perf_counter()
        train_epoch(sides[name], batches, loss_fn, optimizers[name], "cpu", DEFAULT_NORMALIZATION,
                    amp=torch.bfloat16, channels_last=True)
        return (time.perf_counter() - started) / args.steps

    for name in sides:
        steps(name)  # warm-up
    times = {name: [] for name in sides}
    for round_ in range(args.rounds):
        for name in list(sides) if round_ % 2 == 0 else reversed(list(sides)):
            times[name].append(steps(name))
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, value in median.items():
        print(f"{name}: {value:.3f} s a step ({', '.join(f'{v:.3f}' for v in times[name])})")
    kernels = [kernel_times(*case) for case in KERNEL_CASES]
    for k in kernels:
        print(f"depthwise {k['channels']}ch {k['side']}px {k['kernel']}x{k['kernel']}/{k['stride']}: "
              f"float32 {k['float32']}, bf16 {k['bf16']}")
    names = list(sides)
    print(json.dumps({"backbone": args.backbone, "decoder": args.decoder, "size": args.size, "batch": args.batch,
                      "threads": args.threads, "step_s": {n: round(v, 3) for n, v in median.items()},
                      "speedup": round(median[names[0]] / median[names[1]], 2), "kernels": kernels}))


if __name__ == "__main__":
    main()
