"""LoRA: a frozen layer plus a trainable low-rank update, W x + (alpha / r) B A x (Hu et al. 2021, eq. 3).

One mechanism for every family: `add_lora(model, targets=...)` wraps the Linear and Conv2d layers whose names
match, in place. B starts at zero, so a fresh adapter leaves the model's outputs exactly as they were; A starts
as peft initialises it (Kaiming-uniform), and the names (`<layer>.lora_A.weight`, `<layer>.lora_B.weight`) are
peft's, so adapters move between genlab and `peft` unchanged (adapt/lora.py). A wrapped Linear or Conv2d keeps
its `weight` and `bias` under their own names (the same Parameter objects: tied weights stay tied, and the base
checkpoint still loads); any other base layer (a quantized one: QLoRA-style) sits under `base_layer`.
"""

from __future__ import annotations

import fnmatch
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from .kernels import kernels


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A bool keep-mask, each element kept with probability 1 - p (to 1/65536), from the default generator.

    Four 16-bit draws per 64-bit random number: on a CPU the generator is most of the cost of dropout
    (`bernoulli_` draws one number per element and is ~4x slower at LoRA's shapes)."""
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, 2 ** 63 - 1)
    draws = words.view(torch.int16)[: x.numel()].view(x.shape)
    return draws >= -32768 + round(p * 65536)


class _LoRAFunction(torch.autograd.Function):
    """y = x W^T + b + s B A (m * x / (1 - p)) for a frozen W, with the gradients of A, B and x by hand.

    The same numbers as the composed layers; faster on a CPU because the dropout mask is drawn cheaply (by the
    compiled kernels where they are built: a hash of each element's index and a key from torch's generator, so the
    backward recomputes the mask instead of keeping it), the low-rank product is accumulated into the base output
    in place (addmm), and each weight gradient is taken as (r x N) @ (N x d), the orientation BLAS runs several
    times faster than autograd's (d x N) @ (N x r)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling, p):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        k = _dropout_kernels(x2) if p else None
        keep, key = None, 0
        if k is not None:
            key = dropout_key()
            xd = k.lora_dropout(x2.contiguous(), key, p)
        elif p:
            keep = dropout_mask(x2, p)
            xd = torch.where(keep, x2, 0.0)
        else:
            xd = x2
        if p:
            a = a / (1.0 - p)  # the dropout's rescaling, folded into A
        h = xd @ a.t()  # (N, r)
        bs = b * scaling
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
        y.addmm_(h, bs.t())
        ctx.save_for_backward(xd, h, weight, a, bs, keep)
        ctx.p, ctx.scaling, ctx.shape, ctx.key, ctx.kernel = p, scaling, shape, key, k is not None
        return y.view(*shape[:-1], y.size(-1))

    @staticmethod
    def backward(ctx, g):
        xd, h, weight, a, bs, keep = ctx.saved_tensors
        g = g.reshape(-1, g.size(-1))
        gh = g @ bs  # (N, r)
        ga = gb = gx = None
        if ctx.needs_input_grad[3]:
            ga = (gh.t() @ xd) / (1.0 - ctx.p)  # (r, in)
        if ctx.needs_input_grad[4]:
            gb = (h.t() @ g).t() * ctx.scaling  # (out, r)
        if ctx.needs_input_grad[0]:
            gx = g @ weight
            if ctx.kernel:
                kernels().lora_dropout_backward(gx, gh.contiguous(), a.contiguous(), ctx.key, ctx.p)
            elif ctx.p:
                gx += torch.where(keep, gh @ a, 0.0)
            else:
                gx.addmm_(gh, a)
            gx = gx.view(ctx.shape)
        return gx, None, None, ga, gb, None, None


def dropout_key() -> int:
    """A 64-bit key for the compiled dropout's mask, from torch's default generator (torch.manual_seed repeats it)."""
    return int(torch.empty((), dtype=torch.int64).random_(-2 ** 63, 2 ** 63 - 1))


def _dropout_kernels(x: torch.Tensor):
    """The compiled kernels where they take x (fp32 on a CPU, under 2^32 elements), else None."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() >= 2 ** 32:
        return None
    return kernels()


class LoRALinear(nn.Module):
    """A Linear layer (or any layer mapping in_features -> out_features) plus B A, rank r, scaled alpha / r."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if type(base) is nn.Linear:
            self.weight, self.bias = base.weight, base.bias  # the same Parameters, frozen by add_lora
            self.base_layer = None
        else:
            self.base_layer = base
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r  # rsLoRA: Kalajdzievski 2023
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, self.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) if self.base_layer is None else self.base_layer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        if (self.base_layer is None and not self.weight.requires_grad and x.dtype == self.weight.dtype
                and (self.bias is None or not self.bias.requires_grad)
                and not torch.is_autocast_enabled(x.device.type) and torch.is_grad_enabled()):
            p = self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0
            return _LoRAFunction.apply(x, self.weight, self.bias, a, b, self.scaling, p)
        return self.base(x) + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update to the weight, (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        if self.base_layer is not None:
            raise ConfigError("an adapter on a quantized layer cannot be merged into it: merge into the "
                              "full-precision run, then quantize")
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight  # keeps a tied weight tied: merging into it changes both of its uses
        with torch.no_grad():
            self.weight += self.delta().to(self.weight.dtype)
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}"


class LoRAConv2d(nn.Module):
    """A Conv2d plus B A: A a convolution of the base's kernel into r channels, B a 1x1 back (peft's layout). The
    base's `weight` and `bias` keep their names, as LoRALinear's do."""

    def __init__(self, base: nn.Conv2d, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ConfigError(f"LoRA on a convolution with groups={base.groups}, padding_mode={base.padding_mode!r} "
                              "is not supported")
        self.weight, self.bias = base.weight, base.bias
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = base.kernel_size, base.stride, base.padding, \
            base.dilation
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_A = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                                bias=False, device=base.weight.device)
        self.lora_B = nn.Conv2d(r, base.out_channels, 1, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        z = F.conv2d(self.lora_dropout(x), a, None, self.stride, self.padding, self.dilation)
        return y + F.conv2d(z, b) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update to the kernel, (out, in, kh, kw): B (out, r, 1, 1) composed with A (r, in, kh, kw)."""
        return torch.einsum("or,rikl->oikl", self.lora_B.weight[:, :, 0, 0], self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None, device="meta")
        conv.weight, conv.bias = self.weight, self.bias
        with torch.no_grad():
            self.weight += self.delta().to(self.weight.dtype)
        return conv

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, r={self.r}, alpha={self.alpha}"


LORA_TYPES = (LoRALinear, LoRAConv2d)


def _matches(name: str, patterns: list[str]) -> bool:
    """peft's rule for a list: a pattern matches a module whose name is it or ends with "." + it; genlab also
    takes shell wildcards (`*attn*`)."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _wrappable(m: nn.Module) -> bool:
    return type(m) in (nn.Linear, nn.Conv2d) or (getattr(m, "quantized", False) and hasattr(m, "in_features"))


def add_lora(model: nn.Module, targets: list[str] | str, *, r: int = 8, alpha: float = 16.0,
             dropout: float = 0.0, rslora: bool = False) -> list[str]:
    """Wrap the layers of `model` whose names match `targets` (a list of names/suffixes/wildcards as peft's
    target_modules, or one regular expression as a string), freeze everything else; returns the wrapped names."""
    if not isinstance(r, int) or r < 1:
        raise ConfigError(f"LoRA rank r={r!r} must be an integer >= 1")
    if alpha <= 0:
        raise ConfigError(f"LoRA alpha={alpha} must be > 0")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"LoRA dropout={dropout} must be in [0, 1)")
    if isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise ConfigError(f"LoRA target pattern {targets!r} is not a regular expression ({e})") from None
        hit = lambda n: rx.fullmatch(n) is not None
    else:
        hit = lambda n: _matches(n, list(targets))
    names = [n for n, m in model.named_modules() if n and hit(n) and _wrappable(m)]
    if not names:
        layers = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _wrappable(m)})
        raise ConfigError(f"LoRA targets {targets!r} match no Linear or Conv2d layer of {type(model).__name__}; "
                          f"its layer names end in: {', '.join(layers)}")
    model.requires_grad_(False)
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, LORA_TYPES):
            raise ConfigError(f"{n} already has an adapter")
        cls = LoRAConv2d if type(m) is nn.Conv2d else LoRALinear
        wrapped = cls(m, r, alpha, dropout, rslora)
        ref = m.weight if hasattr(m, "weight") and isinstance(m.weight, nn.Parameter) else None
        if ref is not None:
            wrapped.to(device=ref.device)
        _set(model, n, wrapped)
    return names


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_TYPES)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors only: `<layer>.lora_A.weight`, `<layer>.lora_B.weight`."""
    out = {}
    for n, m in lora_layers(model).items():
        out[f"{n}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{n}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layers back (in place)."""
    for n, m in lora_layers(model).items():
        _set(model, n, m.merged())
    return model


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
