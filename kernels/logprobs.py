"""Per-sequence log-probabilities in one pass over the logits: Triton forward and backward.

Math. For the row x = logits[b, t, :] over a vocabulary of V, its label y = labels[b, t] and the
mask m[b, t] = (y != ignore_index):

    lse[b, t] = log sum_v exp(x[v])        (online over vocabulary blocks: running max M, sum S,
                                            S <- S * exp(M_old - M_new) + sum_block exp(x - M_new))
    out[b]    = s[b] * sum_t m[b, t] * (x[y] - lse[b, t])
    d out[b] / d x[v] = s[b] * m[b, t] * (1[v == y] - exp(x[v] - lse[b, t]))

where s[b] = 1, or 1 / max(1, sum_t m[b, t]) when averaging (a row with nothing scored gives 0).

Shapes and dtypes. logits [B, T, V] in fp32, bf16 or fp16 with any strides: the kernels take the
three strides, so a shifted view such as `logits[:, :-1]` is read in place and never copied.
labels [B, T] integer, any strides. out [B] fp32. One program handles one (b, t) row.

Forward: loads each block in the input dtype, computes in fp32, keeps the running max and sum,
and reads the label's logit with a single load (masked to [0, V), so a bad label gives NaN rather
than an out-of-bounds read). It writes the token's log-prob and saves one fp32 lse per token;
rows whose label is ignore_index are never read. Backward: reads each row once more and writes
g[b] * s[b] * m * (onehot - softmax) once, in the logits' dtype, with no fp32 [B, T, V] temporary.

Labels are checked on the host before the launch (`check_labels=True`, one small reduction and a
device sync); set MINIDPO_CHECK_LABELS=0 to skip it, the kernels then give NaN for a bad label.

The fused head (minidpo.logprobs.sequence_logprobs_from_hidden) runs the same two kernels on each
fp32 [n, V] chunk of logits it builds: `rows_forward` (token log-prob and lse per row) and
`rows_backward_` (the gradient written over the chunk, in place: each program reads a block of
its row before it writes that block).

GPU_COMPILE_CASES lists the (kernel, signature, constexprs, options) of every launch
configuration, so CI compiles each for real GPUs without one (tests/test_kernels_compile.py).
"""
import os

import torch
import triton
import triton.language as tl

from minidpo.logprobs import IGNORE_INDEX, check_logprobs_inputs, sequence_scale

MAX_BLOCK_V = 4096  # vocabulary entries per loop step: 8-16 KiB of a row in registers
CHECK_LABELS = os.environ.get("MINIDPO_CHECK_LABELS", "1") != "0"


@triton.jit
def _logprobs_fwd_kernel(
    x_ptr, labels_ptr, token_ptr, lse_ptr,
    T, V, stride_xb, stride_xt, stride_xv, stride_lb, stride_lt,
    ignore_index, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    y = tl.load(labels_ptr + b * stride_lb + t * stride_lt).to(tl.int64)
    if y != ignore_index:
        x_row = x_ptr + b * stride_xb + t * stride_xt
        m = float("-inf")
        s = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V).to(tl.int64)
            x = tl.load(x_row + offs * stride_xv, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            # A block of -inf logits keeps m at -inf: shift by 0 there so no inf - inf appears.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
            m = m_new
        lse = m + tl.log(s)
        in_vocab = (y >= 0) & (y < V)
        x_y = tl.load(x_row + y * stride_xv, mask=in_vocab, other=float("nan")).to(tl.float32)
        tl.store(token_ptr + row, x_y - lse)
        tl.store(lse_ptr + row, lse)
    else:
        tl.store(token_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)


@triton.jit
def _logprobs_bwd_kernel(
    x_ptr, labels_ptr, lse_ptr, gscale_ptr, grad_ptr,
    T, V, stride_xb, stride_xt, stride_xv, stride_lb, stride_lt,
    ignore_index, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    y = tl.load(labels_ptr + b * stride_lb + t * stride_lt).to(tl.int64)
    scored = y != ignore_index
    g = tl.where(scored, tl.load(gscale_ptr + b), 0.0)
    lse = tl.load(lse_ptr + row)
    x_row = x_ptr + b * stride_xb + t * stride_xt
    grad_row = grad_ptr + row * V  # the gradient is allocated contiguous
    read_end = tl.where(scored, V, 0)  # unscored rows load nothing (all lanes masked), write zeros
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V).to(tl.int64)
        in_row = offs < V
        x = tl.load(x_row + offs * stride_xv, mask=offs < read_end, other=float("-inf"))
        p = tl.exp(x.to(tl.float32) - lse)
        d = g * (tl.where(offs == y, 1.0, 0.0) - p)
        tl.store(grad_row + offs, d.to(grad_ptr.dtype.element_ty), mask=in_row)


# Fixed when this module is imported: under TRITON_INTERPRET=1 @triton.jit gives a CPU interpreter.
INTERPRETED = not isinstance(_logprobs_fwd_kernel, triton.runtime.JITFunction)


def _launch_config(logits, block_v):
    """Check the device and pick (BLOCK_V, num_warps) for a vocabulary of V."""
    if not (logits.is_cuda or INTERPRETED):
        raise ValueError(
            f"backend='triton' runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1, set before "
            f"triton is imported); logits are on {logits.device}")
    vocab = logits.shape[-1]
    block_v = block_v or min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    return block_v, (8 if block_v >= 2048 else 4)


def logprobs_forward(logits, labels, ignore_index=IGNORE_INDEX, *, check_labels=True, block_v=None):
    """logits [B, T, V] (any strides), labels [B, T] -> (token log-probs [B, T] fp32, lse [B, T] fp32).

    Unscored tokens (label == ignore_index) get 0 in both outputs.
    """
    check_logprobs_inputs(logits, labels, ignore_index, check_labels=check_labels and CHECK_LABELS)
    block_v, num_warps = _launch_config(logits, block_v)
    B, T, V = logits.shape
    token_logps = torch.empty(B, T, device=logits.device, dtype=torch.float32)
    lse = torch.empty(B, T, device=logits.device, dtype=torch.float32)
    if B * T:
        _logprobs_fwd_kernel[(B * T,)](
            logits, labels, token_logps, lse, T, V, *logits.stride(), *labels.stride(),
            ignore_index, BLOCK_V=block_v, num_warps=num_warps)
    return token_logps, lse


def logprobs_backward(logits, labels, lse, gscale, ignore_index=IGNORE_INDEX, *, block_v=None, out=None):
    """d(sum_b gscale[b] * sum_t logp[b, t]) / d logits: [B, T, V] contiguous, in the logits' dtype.

    lse [B, T] fp32 from `logprobs_forward`; gscale [B] fp32 (upstream gradient times s[b]).
    `out`: a contiguous [B, T, V] tensor of the logits' dtype to write into (the logits themselves
    when contiguous: each program reads a block before it writes it).
    """
    block_v, num_warps = _launch_config(logits, block_v)
    B, T, V = logits.shape
    if lse.shape != (B, T) or gscale.shape != (B,):
        raise ValueError(f"lse {tuple(lse.shape)} / gscale {tuple(gscale.shape)} do not match logits "
                         f"{tuple(logits.shape)}")
    if out is not None and (out.shape != logits.shape or out.dtype != logits.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {logits.dtype} tensor of shape {tuple(logits.shape)}")
    grad = torch.empty((B, T, V), device=logits.device, dtype=logits.dtype) if out is None else out
    if B * T:
        _logprobs_bwd_kernel[(B * T,)](
            logits, labels, lse.contiguous(), gscale.float().contiguous(), grad, T, V,
            *logits.stride(), *labels.stride(), ignore_index, BLOCK_V=block_v, num_warps=num_warps)
    return grad


def rows_forward(x, labels):
    """x [n, V] (a fused-head chunk), labels [n] in [0, V) -> (token log-probs [n], lse [n]) fp32."""
    token, lse = logprobs_forward(x[:, None], labels[:, None], check_labels=False)
    return token[:, 0], lse[:, 0]


def rows_backward_(x, labels, lse, g):
    """Overwrite x [n, V] (contiguous) with g[i] * (onehot(labels[i]) - softmax(x[i])); -> x.
    lse [n] from `rows_forward`, g [n] fp32."""
    logprobs_backward(x[:, None], labels[:, None], lse[:, None], g.float().contiguous(), out=x[:, None])
    return x


class TritonSequenceLogprobs(torch.autograd.Function):
    """Autograd around the two kernels; saves the logits (a reference, no copy) and lse [B, T]."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, average, block_v):
        token_logps, lse = logprobs_forward(
            logits, labels, ignore_index, check_labels=False, block_v=block_v)
        scale = sequence_scale(labels, ignore_index, average)
        ctx.save_for_backward(logits, labels, lse, scale)
        ctx.ignore_index, ctx.block_v = ignore_index, block_v
        return token_logps.sum(1) * scale

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse, scale = ctx.saved_tensors
        grad = logprobs_backward(
            logits, labels, lse, grad_out.float() * scale, ctx.ignore_index, block_v=ctx.block_v)
        return grad, None, None, None, None


def triton_sequence_logprobs(logits, labels, *, ignore_index=IGNORE_INDEX, average=False, block_v=None):
    """logits [B, T, V] fp32/bf16/fp16, labels [B, T] -> [B] fp32 summed (or averaged) log-probs.

    Checks the inputs (labels on the host, see CHECK_LABELS), then runs the Triton kernels.
    `block_v` (a power of two) overrides the vocabulary block, for tests.
    """
    check_logprobs_inputs(logits, labels, ignore_index, check_labels=CHECK_LABELS)
    return TritonSequenceLogprobs.apply(logits, labels, ignore_index, average, block_v)


def _compile_cases():
    """Every launch configuration: logits fp32 (the fused head's chunks), bf16, fp16 with int64
    labels, and int32 labels; ints as i32 (sizes and strides under 2**31); the largest vocabulary
    block (V >= 4096) with its 8 warps."""
    ints = {name: "i32" for name in ("T", "V", "stride_xb", "stride_xt", "stride_xv", "stride_lb",
                                     "stride_lt", "ignore_index")}
    cases = []
    for x, y in (("fp32", "i64"), ("bf16", "i64"), ("fp16", "i64"), ("fp32", "i32")):
        fwd = {"x_ptr": f"*{x}", "labels_ptr": f"*{y}", "token_ptr": "*fp32", "lse_ptr": "*fp32"}
        bwd = {"x_ptr": f"*{x}", "labels_ptr": f"*{y}", "lse_ptr": "*fp32", "gscale_ptr": "*fp32",
               "grad_ptr": f"*{x}"}
        for kernel, pointers in ((_logprobs_fwd_kernel, fwd), (_logprobs_bwd_kernel, bwd)):
            cases.append((kernel, {**pointers, **ints, "BLOCK_V": "constexpr"}, {"BLOCK_V": MAX_BLOCK_V},
                          {"num_warps": 8}))
    return cases


GPU_COMPILE_CASES = _compile_cases()
