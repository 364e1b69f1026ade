"""4-bit NormalFloat (NF4) storage for frozen Linear weights: the QLoRA base (Dettmers et al., 2023).

Layout, bitsandbytes' own, so its checkpoints load and our codes equal its bit for bit. A weight of
shape (out, in) is flattened row-major and cut into blocks of `block_size` (64) values. Each block
keeps absmax = max |w| in fp32, and each value the index of the nearest of the 16 NF4 code values
(quantiles of N(0, 1) scaled into [-1, 1]) to w / absmax. Two indices share a byte, the first element
in the high nibble: `packed` uint8 [(n + 1) // 2, 1]. Dequantized:

    w = code[index] * absmax[block]                    (fp32, then cast to the compute dtype)

Double quantization (QLoRA's, on by default in `load_model`): absmax minus its mean is stored as
8-bit indices into bitsandbytes' signed dynamic map, in blocks of 256 with one fp32 absmax each:

    absmax = dynamic[q] * nested_absmax[block // 256] + offset

Bits per weight: 4 + 32/64 = 4.5, or 4 + 8/64 + 32/(64 * 256) = 4.127 with double quantization.
Rounding is bitsandbytes' own torch implementation, bit for bit: each index bucketizes
x * (1 / absmax), clamped to [-1, 1], over the midpoints of its code (a tie goes to the lower code).
(Its native CPU kernel for the 8-bit stage multiplies by an approximate reciprocal instead, so about
0.2% of the 8-bit indices, those within ~2% of a midpoint, land one step away there.)

`NF4Linear` is the frozen layer: forward dequantizes the weight into the activations' dtype and
multiplies, and backward (gradient of the input only: the base is frozen) dequantizes it again, so
no full-precision copy is kept between the two. A `LoRALinear` wraps it unchanged: `F.linear` on an
`NF4Weight` is routed here through `__torch_function__`. On CUDA the dequantization is the Triton
kernel of `minidpo.kernels.nf4`; elsewhere plain torch, a chunk at a time.
"""
import ctypes
import functools
import importlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# The 16 NF4 values of the QLoRA paper (bitsandbytes' `get_4bit_type("nf4")`), sorted.
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the sizes bitsandbytes accepts
NESTED_BLOCK = 256  # double quantization: absmax values per 8-bit block
CHUNK = 1 << 18  # values quantized or dequantized at once on the CPU: bounds the fp32 temporaries
BNB_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`), fp32 [256], sorted: exponent
    e = 0..6 has the 2^e means of a linear split of [0.1, 1], times 10^(e - 6), of either sign; plus
    0 and 1."""
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (e - 6) * means).tolist() + (-(10 ** (e - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def _block_absmax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 [ceil(n / block_size)]: max |x| per block, as bitsandbytes computes it (a short last
    block's value floored at 1e-38)."""
    full = x.numel() - x.numel() % block_size
    absmax = x[:full].view(-1, block_size).abs().amax(dim=-1)
    if full < x.numel():
        absmax = torch.cat([absmax, x[full:].abs().max().clamp(min=1e-38).view(1)])
    return absmax


def _indices(x: torch.Tensor, absmax: torch.Tensor, block_size: int, code: torch.Tensor):
    """int32 indices into the sorted `code` of fp32 values `x` (whole blocks, then maybe a short one)."""
    bounds = (code[:-1] + code[1:]) / 2
    full = x.numel() - x.numel() % block_size
    scaled = (x[:full].view(-1, block_size) * (1.0 / absmax[:full // block_size].clamp(min=1e-38)[:, None]))
    scaled = scaled.clamp(-1, 1).view(-1)
    if full < x.numel():  # bitsandbytes divides the short last block, and multiplies the others
        scaled = torch.cat([scaled, (x[full:] / absmax[-1]).clamp(-1, 1)])
    return torch.bucketize(scaled, bounds, out_int32=True)


def _quantize_absmax(absmax: torch.Tensor):
    """Double quantization: -> (uint8 indices, fp32 nested absmax, dynamic map, fp32 offset)."""
    offset = absmax.mean()
    centred = absmax - offset
    nested = _block_absmax(centred, NESTED_BLOCK)
    code = dynamic_map().to(absmax.device)
    return _indices(centred, nested, NESTED_BLOCK, code).to(torch.uint8), nested, code, offset


def _check_weight(weight, block_size):
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() < 1:
        raise ValueError(f"quantize_nf4: weight must be a floating-point tensor, got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantize_nf4: weight dtype {weight.dtype} is not one of float32, bfloat16, float16")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"quantize_nf4: block_size={block_size!r}; choose one of {list(BLOCK_SIZES)}")


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, *, block_size: int = 64, double_quant: bool = False) -> "NF4Weight":
    """A float tensor (fp32, bf16 or fp16, any shape) -> its `NF4Weight`, on the same device.

    Equal to bitsandbytes' `quantize_4bit(weight, blocksize=block_size, quant_type="nf4",
    compress_statistics=double_quant)` on CPU: the same packed bytes, absmax and statistics (the 8-bit
    absmax indices: those of its torch kernel, see the module docstring).
    Works a chunk at a time, so the temporaries stay small whatever the weight's size.
    """
    _check_weight(weight, block_size)
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=weight.device)
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=weight.device)
    step = CHUNK - CHUNK % block_size
    for start in range(0, n, step):
        part = flat[start:start + step].float()
        scale = _block_absmax(part, block_size)
        absmax[start // block_size:start // block_size + scale.numel()] = scale
        q = _indices(part, scale, block_size, code).to(torch.uint8)
        if q.numel() % 2:  # the odd last value's partner nibble: bitsandbytes pads with 0.0 (index 7)
            q = torch.cat([q, q.new_full((1,), 7)])
        packed[start // 2:start // 2 + q.numel() // 2, 0] = (q[::2] << 4) | q[1::2]
    nested = _quantize_absmax(absmax) if double_quant else None
    if nested is not None:
        absmax, nested = nested[0], nested[1:]
    return NF4Weight(packed, absmax, code, weight.shape, weight.dtype, block_size, nested)


def dequantize_reference(packed, absmax, code, n: int, block_size: int, dtype) -> torch.Tensor:
    """Plain torch: packed uint8, fp32 absmax [blocks] and code [16] -> [n] in `dtype`, computed in
    fp32 (code * absmax) as bitsandbytes does, CHUNK values at a time."""
    pairs = torch.stack(torch.meshgrid(code, code, indexing="ij"), -1).view(256, 2)  # byte -> (hi, lo)
    flat = packed.view(-1)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    step = CHUNK - CHUNK % block_size
    for start in range(0, n, step):
        end = min(n, start + step)
        values = pairs.index_select(0, flat[start // 2:(end + 1) // 2].int()).view(-1)[:end - start]
        scale = absmax[start // block_size:-(-end // block_size)]
        full = (end - start) - (end - start) % block_size
        # Products in fp32, rounded once into `out` (as `.to(dtype)` would), no full-size temporary.
        torch.mul(values[:full].view(-1, block_size), scale[:full // block_size, None],
                  out=out[start:start + full].view(-1, block_size))
        if full < end - start:
            torch.mul(values[full:], scale[-1], out=out[start + full:end])
    return out


def _kernels():
    """minidpo.kernels.nf4 (imported the way minidpo.logprobs finds the kernels package)."""
    from minidpo.logprobs import triton_kernels

    triton_kernels()
    return importlib.import_module("minidpo.kernels.nf4")


class NF4Weight(nn.Module):
    """A frozen weight in NF4 (see the module docstring): `packed` uint8 [(n + 1) // 2, 1], `absmax`
    (fp32 [blocks], or uint8 with double quantization plus `nested_absmax` fp32, `nested_code`
    fp32 [256], `offset` fp32), `code` fp32 [16]; `shape` and `dtype` of the original weight.

    Buffers, so `.to(device)` and `state_dict` carry them. `F.linear(x, w, b)` on it runs `nf4_linear`;
    any other torch function raises, rather than silently reading the codes as numbers.
    """

    def __init__(self, packed, absmax, code, shape, dtype, block_size: int = 64, nested=None):
        super().__init__()
        self.shape, self.dtype, self.block_size = torch.Size(shape), dtype, block_size
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.register_buffer("code", code)
        self.double_quant = nested is not None
        if nested is not None:
            nested_absmax, nested_code, offset = nested
            self.register_buffer("nested_absmax", nested_absmax)
            self.register_buffer("nested_code", nested_code)
            self.register_buffer("offset", torch.as_tensor(offset, dtype=torch.float32, device=packed.device))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def _apply(self, fn, recurse=True):
        """Follow `model.to(device)`, never a dtype cast (`model.half()`): the statistics stay fp32."""
        device = fn(torch.empty(0, device=self.device)).device
        for name, buffer in self._buffers.items():
            self._buffers[name] = buffer.to(device)
        return self

    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        """Bytes held: codes, absmax and statistics."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def scales(self) -> torch.Tensor:
        """fp32 [blocks]: the per-block absmax, decoded from its 8 bits with double quantization."""
        if not self.double_quant:
            return self.absmax
        nested = self.nested_absmax.repeat_interleave(NESTED_BLOCK)[:self.absmax.numel()]
        return self.nested_code[self.absmax.int()] * nested + self.offset

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The weight (`shape`) in `dtype` (default: the dtype it was quantized from)."""
        dtype = dtype or self.dtype
        if self.packed.device.type == "cuda":
            out = _kernels().nf4_dequantize(self.packed, self.scales(), self.code, self.numel(), self.block_size, dtype)
        else:
            out = dequantize_reference(self.packed, self.scales(), self.code, self.numel(), self.block_size, dtype)
        return out.view(self.shape)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is F.linear:
            return nf4_linear(*args, **(kwargs or {}))
        raise TypeError(f"{getattr(func, '__name__', func)} is not defined on an NF4 weight (only F.linear is); "
                        f"call .dequantize() for a plain tensor")

    def extra_repr(self):
        return (f"shape={tuple(self.shape)}, dtype={self.dtype}, block_size={self.block_size}, "
                f"double_quant={self.double_quant}")


class NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward; W gets no gradient."""

    @staticmethod
    def forward(ctx, x, weight: NF4Weight, bias):
        ctx.weight = weight  # the 4-bit weight itself: nothing of full size is saved for backward
        return F.linear(x, weight.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        dx = grad @ ctx.weight.dequantize(grad.dtype) if ctx.needs_input_grad[0] else None
        db = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, db


def nf4_linear(x: torch.Tensor, weight: NF4Weight, bias=None) -> torch.Tensor:
    """`F.linear` on an NF4 weight: x (..., in) -> (..., out), computed in x's dtype (under CUDA
    autocast in its dtype, as autocast would run the product); the bias is cast to it."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        x = x.to(torch.get_autocast_dtype("cuda"))
    bias = None if bias is None else bias.to(x.dtype)
    return NF4LinearFunction.apply(x, weight, bias)


class NF4Linear(nn.Module):
    """A frozen `nn.Linear` whose weight is an `NF4Weight` (the bias, if any, stays a Parameter)."""

    def __init__(self, weight: NF4Weight, bias=None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias

    def forward(self, x):
        return nf4_linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ---------------------------------------------------------------------------------------------------
# Models: which layers are quantized, and bitsandbytes' checkpoint layout.

def quantizable(model: nn.Module) -> list:
    """Names of the Linear weights a 4-bit base stores in NF4: every Linear but the head (embeddings,
    norms and `lm_head` stay in the compute dtype, as bitsandbytes/transformers leave them)."""
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return lambda pad: 0


def release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc). Quantizing while loading frees each
    full-precision weight under small long-lived buffers, and glibc would keep those pages: RSS then
    grew to ~1.5x the quantized model instead of ~1.1x."""
    _malloc_trim()(0)


def install(model: nn.Module, weight_name: str, weight: NF4Weight) -> None:
    """Replace the Linear owning `weight_name` (`<module>.weight`) by an NF4Linear of `weight`."""
    parent_name, _, child = weight_name.removesuffix(".weight").rpartition(".")
    parent = model.get_submodule(parent_name)
    linear = getattr(parent, child)
    if tuple(weight.shape) != (linear.out_features, linear.in_features):
        raise ValueError(f"{weight_name}: NF4 weight of shape {tuple(weight.shape)}, model expects "
                         f"{(linear.out_features, linear.in_features)}")
    setattr(parent, child, NF4Linear(weight, linear.bias))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, NF4Weight) for m in model.modules())


def bnb_4bit(folder: Path) -> bool:
    """True for a folder bitsandbytes quantized to NF4 (config.json's `quantization_config`);
    other bitsandbytes or quantization methods are refused by name."""
    config = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config")
    if not config:
        return False
    method = config.get("quant_method")
    if method != "bitsandbytes" or not config.get("load_in_4bit"):
        raise ValueError(f"{folder}/config.json: quantization_config {method!r} "
                         f"(load_in_8bit={config.get('load_in_8bit')}) is not supported; minidpo reads "
                         f"bitsandbytes 4-bit NF4 checkpoints, or full-precision ones")
    if config.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise ValueError(f"{folder}/config.json: bnb_4bit_quant_type={config.get('bnb_4bit_quant_type')!r}; "
                         f"only nf4 is supported")
    if config.get("bnb_4bit_quant_storage", "uint8") != "uint8":
        raise ValueError(f"{folder}/config.json: bnb_4bit_quant_storage={config['bnb_4bit_quant_storage']!r}; "
                         f"only uint8 is supported")
    return True


def from_bnb(name: str, parts: dict) -> NF4Weight:
    """bitsandbytes' tensors of one weight (keys '' for the packed codes, and BNB_PARTS) -> NF4Weight."""
    missing = [k for k in ("", "absmax", "quant_map", BNB_PARTS[-1]) if k not in parts]
    if missing:
        raise ValueError(f"{name}: bitsandbytes tensors {[f'{name}.{k}'.rstrip('.') for k in missing]} are missing")
    state = json.loads(bytes(parts[BNB_PARTS[-1]].cpu().numpy()).decode())
    if state.get("quant_type") != "nf4":
        raise ValueError(f"{name}: quant_type {state.get('quant_type')!r}; only nf4 is supported")
    shape, block = tuple(state["shape"]), state["blocksize"]
    n = math.prod(shape)
    packed, absmax = parts[""].reshape(-1, 1), parts["absmax"]
    nested = None
    if "nested_absmax" in parts:
        nested = (parts["nested_absmax"].float(), parts["nested_quant_map"].float(),
                  torch.tensor(float(state["nested_offset"]), dtype=torch.float32))
        if state.get("nested_blocksize", NESTED_BLOCK) != NESTED_BLOCK:
            raise ValueError(f"{name}: nested_blocksize {state['nested_blocksize']} (only {NESTED_BLOCK})")
    else:
        absmax = absmax.float()
    blocks = -(-n // block)
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2 or absmax.numel() != blocks:
        raise ValueError(f"{name}: {packed.numel()} packed bytes ({packed.dtype}) and {absmax.numel()} absmax "
                         f"values do not fit shape {shape} in blocks of {block}")
    if nested is not None and nested[0].numel() != -(-blocks // NESTED_BLOCK):
        raise ValueError(f"{name}.nested_absmax has {nested[0].numel()} values for {blocks} blocks")
    return NF4Weight(packed, absmax, parts["quant_map"].float(), shape, getattr(torch, state["dtype"]),
                     block, nested)


def split_bnb_name(name: str, weights) -> tuple:
    """'a.weight.absmax' -> ('a.weight', 'absmax'); 'a.weight' -> ('a.weight', ''); else (None, None)."""
    if name in weights:
        return name, ""
    for part in BNB_PARTS:
        base = name.removesuffix("." + part)
        if base != name and base in weights:
            return base, part
    return None, None
