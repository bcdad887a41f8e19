"""models.host_memory: a training step's freed buffers stay in the process for the next step, counted
with the process's own page-fault counter in fresh interpreters (the setting is process-wide)."""
import json
import platform
import subprocess
import sys

import pytest

from .conftest import ROOT

STEPS = """
import json, resource, sys, torch
from models.host_memory import reuse_freed_memory
kept = reuse_freed_memory() if sys.argv[1] == "reuse" else None
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1),
                          torch.nn.ReLU(), torch.nn.Conv2d(32, 4, 1))
x = torch.randn(4, 3, 128, 128)  # activations of 8 MiB: above glibc's initial mmap threshold
def step():
    net(x).square().mean().backward()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _steps(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_training_steps_reuse_freed_buffers_instead_of_faulting_fresh_pages_in():
    default, reused = _steps("default"), _steps("reuse")
    assert reused["kept"] is True
    assert default["faults"] > 10 * (8 << 20) // 4096  # at least a fresh 8 MiB buffer a step
    assert reused["faults"] < default["faults"] / 4
