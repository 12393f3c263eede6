"""genlab's compiled CPU kernels (kernels.cpp): for decoding, matrix products on fp32, int8 and int4 weights for a
few rows of x and a whole Llama layer step in one call; for LoRA training, the adapter's dropout (nn/lora.py).
Built once per machine (~45 s) with PyTorch's extension builder into its cache, keyed by the source's hash;
`kernels()` is None where they cannot be built (no AVX2, no C++ compiler, GENLAB_KERNELS=0): callers then use
PyTorch's ops, same numbers (a dropout mask of the same distribution, drawn differently), slower."""

from __future__ import annotations

import hashlib
import logging
import os
import sysconfig
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 16  # up to this many rows of x (tokens in a step) the kernels read the weights once for all

_BUILT: list = []  # [module or None], built on first use


def kernels():
    """The compiled module, or None where it cannot be built (the reason is logged once)."""
    if _BUILT:
        return _BUILT[0]
    mod = None
    if os.environ.get("GENLAB_KERNELS", "1") != "0" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        try:
            from torch.utils.cpp_extension import load

            scripts = sysconfig.get_paths()["scripts"]  # the `ninja` of this environment (a dependency)
            if scripts not in os.environ.get("PATH", "").split(os.pathsep):
                os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
            src = Path(__file__).with_name("kernels.cpp")
            tag = hashlib.sha256(src.read_bytes()).hexdigest()[:10]
            log.info("loading genlab's CPU kernels (built once per machine, ~45 s)")
            mod = load(name=f"genlab_kernels_{tag}", sources=[str(src)], verbose=False,  # OpenMP: at::parallel_for
                       extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
        except Exception as e:  # noqa: BLE001 -- any build failure: fall back, say why once
            log.warning("genlab's CPU kernels could not be built (%s); decoding uses PyTorch's ops (same numbers, "
                        "slower)", str(e).splitlines()[0][:200] if str(e) else type(e))
    _BUILT.append(mod)
    return mod


_NONE = torch.empty(0)


def operand(m: torch.nn.Module):
    """A bias-free Linear layer as the kernels take it: (kind, a, b, c, group), kind 0 = fp32 weight, 1 = int8
    rows + scales, 2 = int4 groups; None where the kernels cannot take it (hooks, a bias, another dtype or
    device, an adapter, a width not a multiple of 8)."""
    if m._forward_hooks or m._forward_pre_hooks or getattr(m, "bias", None) is not None:
        return None
    if type(m) is torch.nn.Linear:
        w = m.weight
        ok = w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous() and w.size(1) % 8 == 0
        return (0, w.detach(), _NONE, _NONE, 0) if ok else None
    if getattr(m, "quantized", False) and hasattr(m, "qweight") and m.qweight.device.type == "cpu":
        if m.method == "int8":
            return (1, m.qweight, m.scales, _NONE, 0) if m.in_features % 8 == 0 else None
        return (2, m.qweight, m.scales, m.offsets, m.group_size) if m.group_size % 32 == 0 else None
    return None
