"""NF4 dequantization in one pass over the packed codes: Triton.

Math. For element i of a weight of n values quantized in blocks of Q (see minidpo.quant):

    byte = packed[i // 2];  index = byte >> 4 if i is even else byte & 15
    out[i] = code[index] * absmax[i // Q]            (fp32, rounded once to the output dtype)

the same products as `minidpo.quant.dequantize_reference` (and bitsandbytes), so both give the same
bits. Shapes and dtypes: packed uint8 [(n + 1) // 2] (contiguous; bitsandbytes' [(n + 1) // 2, 1]
is the same memory), absmax fp32 [ceil(n / Q)] (double quantization already decoded: it is n / Q
values, a 1/64 of the weight), code fp32 [16], out [n] fp32, bf16 or fp16, contiguous.

One program reads BLOCK consecutive bytes (one coalesced load), looks both nibbles up in the
16-entry code (it stays in L1), multiplies by the absmax of their block (Q is even, so a byte's two
elements share it) and stores the 2 * BLOCK outputs interleaved, in order, with one store.
"""
import torch
import triton
import triton.language as tl

from minidpo.quant import BLOCK_SIZES, dequantize_reference  # noqa: F401 (the reference, for tests)

BLOCK = 1024  # bytes per program: 2048 outputs


@triton.jit
def _nf4_dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, QBLOCK: tl.constexpr,
                           BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    first = 2 * byte  # the element in the byte's high nibble
    live = first < n
    b = tl.load(packed_ptr + byte, mask=live, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + first // QBLOCK, mask=live, other=0.0)
    hi = tl.load(code_ptr + (b >> 4)) * scale
    lo = tl.load(code_ptr + (b & 15)) * scale
    offs = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK).to(tl.int64)
    values = tl.interleave(hi, lo)  # [2 * BLOCK]: hi0, lo0, hi1, lo1, ...
    tl.store(out_ptr + offs, values.to(out_ptr.dtype.element_ty), mask=offs < n)


# Fixed when this module is imported: under TRITON_INTERPRET=1 @triton.jit gives a CPU interpreter.
INTERPRETED = not isinstance(_nf4_dequantize_kernel, triton.runtime.JITFunction)
OUT_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# The exact ASTSource arguments of every launch (contract 2: compiled for sm_80 and sm_90 in CI).
GPU_COMPILE_CASES = [
    (_nf4_dequantize_kernel,
     {"packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": f"*{t}", "n": "i64",
      "QBLOCK": "constexpr", "BLOCK": "constexpr"},
     {"QBLOCK": q, "BLOCK": BLOCK})
    for t in OUT_TYPES.values() for q in (64,)
]


def _check(packed, absmax, code, n, block_size, dtype):
    if not (packed.is_cuda or INTERPRETED):
        raise ValueError(f"the NF4 Triton kernel runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1, "
                         f"set before triton is imported); packed codes are on {packed.device}")
    if dtype not in OUT_TYPES:
        raise ValueError(f"NF4 dequantization writes {list(OUT_TYPES)}, not {dtype}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size}; choose one of {list(BLOCK_SIZES)}")
    expect = {"packed": (packed, torch.uint8, (n + 1) // 2), "absmax": (absmax, torch.float32, -(-n // block_size)),
              "code": (code, torch.float32, 16)}
    for name, (t, dt, size) in expect.items():
        if t.dtype != dt or t.numel() != size or not t.is_contiguous() or t.device != packed.device:
            raise ValueError(f"nf4_dequantize: {name} must be a contiguous {dt} tensor of {size} values on "
                             f"{packed.device}, got {t.dtype} of {t.numel()} on {t.device}")


def nf4_dequantize(packed, absmax, code, n: int, block_size: int, dtype) -> torch.Tensor:
    """packed uint8 [(n + 1) // 2] (any shape of that size), absmax fp32 [ceil(n / block_size)],
    code fp32 [16] -> [n] in `dtype` (fp32, bf16 or fp16), computed in fp32."""
    _check(packed, absmax, code, n, block_size, dtype)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    if n:
        grid = (triton.cdiv((n + 1) // 2, BLOCK),)
        _nf4_dequantize_kernel[grid](packed, absmax, code, out, n, QBLOCK=block_size, BLOCK=BLOCK, num_warps=4)
    return out
