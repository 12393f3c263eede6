"""Process settings (core/runtime.py): the allocator setting that training makes on a CPU."""

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
import torch
from genlab.core.runtime import reuse_freed_memory
if sys.argv[1] == "fit":  # as a user trains: a few steps through fit, which makes the setting itself
    from genlab.core.outputs import StepOutput
    from genlab.training.trainer import TrainConfig, fit

    class Line(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.w = None, torch.nn.Parameter(torch.zeros(4))

        def loss(self, batch):
            return StepOutput(((batch @ self.w - 1.0) ** 2).mean(), {}, n_items=len(batch))

    class Data:
        def train_batch(self, batch_size, generator):
            return torch.randn(batch_size, 4, generator=generator)

        def eval_batches(self, batch_size, max_batches=None):
            return [torch.ones(8, 4)]

    fit(Line(), Data(), TrainConfig(max_steps=3, batch_size=8, eval_every=0, checkpoint_every=0, progress=False))
on = reuse_freed_memory() if sys.argv[1] == "call" else None  # after fit: not called again before the count
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # what each training step does: a large tensor (100 MB, as a SmolLM2 step's logits), written, freed
    t = torch.empty(25_000_000).fill_(1.0)
    del t
for _ in range(3):  # the first steps may still grow the heap
    step()
f0 = faults()
for _ in range(3):
    step()
print(json.dumps({"on": on, "again": reuse_freed_memory(), "faults": faults() - f0}))
"""


def _probe(how="call", **env):
    out = subprocess.run([sys.executable, "-c", PROBE, how], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_training_keeps_freed_memory_for_the_next_step_instead_of_page_faulting_it_again():
    on, off = _probe(), _probe(GENLAB_HEAP="0")
    assert on["on"] and on["again"] and not off["on"]
    pages = 3 * 100_000_000 // 4096  # a fresh mmap faults every page of each 100 MB tensor
    assert off["faults"] > 0.8 * pages
    assert on["faults"] < 0.05 * pages  # reused from the heap: already mapped


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_fit_on_a_cpu_makes_the_setting_itself():
    assert _probe("fit")["faults"] < 0.05 * (3 * 100_000_000 // 4096)  # without fit's setting: ~all pages
