"""Per-sequence log-probabilities of labels under logits, the quantity every DPO loss compares.
Imports torch only (minidpo.kernels imports this module, so it must stay below them).

Which implementation runs when (the training loop enters through `model_logprobs`):
    a plain `nn.Linear` head  -> the fused head (`sequence_logprobs_from_hidden`): no [B, T, V] logits;
                                 each chunk's log-softmax by the Triton kernels on CUDA, torch ops on CPU
    any other head (LoRA on   -> the model's logits, then `sequence_logprobs`: backend "auto" is the
    `lm_head`, say)              Triton kernel for CUDA tensors, the threaded chunked torch path otherwise
    CPU under TRITON_INTERPRET=1 -> backend="triton" runs the kernels interpreted (the tests' check)

    sequence_logprobs(logits [B, T, V], labels [B, T]) -> [B] fp32
        out[b] = sum_t m[b, t] * log_softmax(logits[b, t])[labels[b, t]],  m = labels != ignore_index
        (divided by sum_t m[b, t] when average=True; a row with nothing scored gives 0).
    No shift inside: logits[b, t] scores labels[b, t]. Pass a shifted view (`logits[:, :-1]`,
    `labels[:, 1:]`); it is read in place.

Backends: "triton" (minidpo.kernels.logprobs: one fused pass each way; CUDA, or CPU under
TRITON_INTERPRET=1), "torch" (below: only scored rows, in chunks that are views of the logits,
each through torch's fused row-wise log_softmax (forward) or softmax (backward, recomputed) into an
fp32 scratch chunk per thread of at most 1 MiB and 1/16 of the logits, or straight into an fp32
gradient; beyond the gradient itself those and a few numbers per token are all the extra memory),
"auto" (triton for CUDA tensors when it imports, torch otherwise). On CPU the torch path and the
fused head share their chunks out to torch.get_num_threads() Python threads running single-threaded
ops (see _run_chunks).

    sequence_logprobs_from_hidden(hidden [B, T, H], weight [V, H], labels [B, T]) -> [B] fp32
        the same with logits = hidden @ weight.T never built: scored tokens go through the head
        chunk_tokens at a time (default_chunk_tokens: 512 on CPU, a fixed fp32 budget on CUDA);
        backward recomputes each chunk's logits. Each chunk's log-softmax runs on the same
        backends: on CUDA the Triton kernels (log-sum-exp and the label's logit in one pass; the
        gradient written once, into the chunk itself), on CPU the torch ops.

Precision. Every logit the head makes is accumulated and kept in fp32: half inputs go through
torch.mm(..., out_dtype=torch.float32) where it runs (CUDA, recent torch; `mm_fp32_output`), else
the head weight is widened to fp32 once per call and the chunks are multiplied in fp32 (CPU; older
torch on CUDA: 2 bytes more per weight for the call). A half logit rounded before the
log-sum-exp (~1e-2 per token) never happens; `head_precision(device)` says which path runs.
"""
import contextlib
import ctypes
import functools
import importlib
import importlib.util
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import nn

IGNORE_INDEX = -100  # a label that scores nothing: prompt, padding (transformers' and TRL's value)
BACKENDS = ("auto", "triton", "torch")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows per torch-path chunk: at most CHUNK_ELEMENTS fp32 and at most 1/CHUNK_FRACTION of the rows.
# 1 MiB (8 rows of 32000), the L2 of each core of the 2-core EPYC it was measured on, so the
# chunk-wide passes after the row-wise fused kernels stay in L2: 8-16 rows measured fastest of
# 4-128, 32 rows ~5-10% slower, 4 rows slower again (per-op overhead).
CHUNK_ELEMENTS = 1 << 18
CHUNK_FRACTION = 16
# Tokens per fused-head chunk on CPU: [512, 32000] fp32 is 64 MiB, and 512 rows keep a GEMM efficient.
DEFAULT_CHUNK_TOKENS = 512
# On CUDA: the fp32 [n, V] chunk (one per call: forward and backward run in it) within 256 MiB,
# 2048 tokens at V = 32000: GEMMs of 2048 rows run near peak, and the extra memory stays bounded.
GPU_CHUNK_BYTES = 256 << 20
HEAD_GRAD_BLOCK_V = 2048  # vocabulary rows per partial sum in the fused head's grad of hidden
LOG2_E = 1.4426950408889634

_kernels_error = None  # why minidpo.kernels.logprobs cannot be imported, once known


def check_label_range(labels, vocab_size, ignore_index, name="labels"):
    """ValueError naming the first label outside [0, vocab_size) that is not ignore_index."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        where = tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"{name}[{', '.join(map(str, where))}] = {labels[where].item()} is outside the vocabulary "
            f"[0, {vocab_size}) and is not ignore_index={ignore_index} ({int(bad.sum())} such labels)")


def check_logprobs_inputs(logits, labels, ignore_index=IGNORE_INDEX, *, check_labels=True):
    """ValueError for logits that are not [B, T, V] fp32/bf16/fp16 or labels not integer [B, T]."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be a [B, T, V] tensor, got {_describe(logits)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    _check_labels(labels, logits.shape, logits.device, ignore_index, check_labels)


def _check_labels(labels, logits_shape, device, ignore_index, check_range):
    """labels must be integer [B, T] on `device`, inside [0, V) unless ignore_index."""
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point \
            or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {_describe(labels)}")
    if tuple(labels.shape) != tuple(logits_shape[:2]):
        raise ValueError(f"labels {tuple(labels.shape)} must be [B, T] of logits {tuple(logits_shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but logits on {device}")
    if logits_shape[2] == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    if check_range:
        check_label_range(labels, logits_shape[2], ignore_index)


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def triton_kernels():
    """The module minidpo.kernels.logprobs, or RuntimeError saying why it cannot be imported."""
    global _kernels_error
    if _kernels_error is None:
        try:
            return _import_kernels()
        except ImportError as e:
            _kernels_error = e
    raise RuntimeError(
        f"backend='triton' is unavailable: {_kernels_error!r}; use backend='torch' "
        "(install triton on a CUDA machine for the fused kernels)") from _kernels_error


def _import_kernels(module: str = "logprobs"):
    """minidpo.kernels.<module>, also from a source tree that is not installed."""
    try:
        return importlib.import_module(f"minidpo.kernels.{module}")
    except ModuleNotFoundError as e:
        if e.name != "minidpo.kernels":
            raise
    # Running from a source tree that is not installed: kernels/ sits next to minidpo/.
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "__init__.py").is_file():
        raise ModuleNotFoundError(f"minidpo.kernels is not installed and {folder} is missing")
    spec = importlib.util.spec_from_file_location(
        "minidpo.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["minidpo.kernels"] = package
    spec.loader.exec_module(package)
    setattr(sys.modules["minidpo"], "kernels", package)
    return importlib.import_module(f"minidpo.kernels.{module}")


def sequence_logprobs(logits, labels, *, ignore_index=IGNORE_INDEX, average=False, backend="auto"):
    """logits [B, T, V] fp32/bf16/fp16 (any strides), labels [B, T] integer -> [B] fp32.

    Sum (or, with average=True, mean) over t of log_softmax(logits[b, t])[labels[b, t]], skipping
    labels equal to ignore_index. backend: "auto", "triton" or "torch" (see the module docstring).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if _triton_usable(logits) else "torch"
    if backend == "triton":
        return triton_kernels().triton_sequence_logprobs(
            logits, labels, ignore_index=ignore_index, average=average)
    check_logprobs_inputs(logits, labels, ignore_index)
    return ChunkedSequenceLogprobs.apply(logits, labels, ignore_index, average)


def _triton_usable(logits):
    if not (isinstance(logits, torch.Tensor) and logits.is_cuda):
        return False
    try:
        triton_kernels()
    except RuntimeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The torch path: scored rows only, in chunks of consecutive rows, through one fp32 scratch chunk.
# ---------------------------------------------------------------------------------------------

def _as_rows(logits):
    """-> (rows [R, V], k) with logits[b, t] == rows[b * k + t], a view of the same memory, or None.

    Works whenever the sequence stride is a multiple of the token stride: contiguous logits and
    shifted views such as logits[:, :-1] (k = T + 1; rows between sequences are never read).
    """
    B, T, V = logits.shape
    sb, st, sv = logits.stride()
    if T == 1:
        st, k = sb, 1
    elif B == 1:
        k = T
    elif st > 0 and sb % st == 0 and sb // st >= T:
        k = sb // st
    else:
        return None
    rows = logits.as_strided(((B - 1) * k + T, V), (st, sv), logits.storage_offset())
    return rows, k


class _Chunk(NamedTuple):
    """Up to _chunk_rows(logits) scored tokens, processed together: the scored tokens s .. s+n-1
    in row-major order (so per-token results are slices of [N] arrays, not scatters)."""
    s: int                     # index of the first one among all scored tokens
    b: torch.Tensor            # [n] sequence of each token
    t: torch.Tensor            # [n] position of each token
    x: Optional[torch.Tensor]  # [n, V] view of their logits rows, or None: gather logits[b, t]
    grad_row: Optional[int]    # their first row in a contiguous [B * T, V] gradient, if consecutive


def _chunk_rows(logits):
    B, T, V = logits.shape
    return max(1, min(CHUNK_ELEMENTS // V, B * T // CHUNK_FRACTION))


def _runs(p, n):
    """Split increasing row numbers p into (start, count) pieces of consecutive rows, count <= n."""
    pieces, start = [], 0
    for i in range(1, len(p) + 1):
        if i == len(p) or p[i] != p[i - 1] + 1 or i - start == n:
            pieces.append((start, i - start))
            start = i
    return pieces


def _chunks(logits, b, t):
    """The scored tokens (b, t) as _Chunks: runs of consecutive logits rows (views, no copy) when
    the strides allow it, else plain slices of the token list to gather."""
    B, T, V = logits.shape
    if b.numel() == 0:
        return []
    n, view = _chunk_rows(logits), _as_rows(logits)
    if view is None:
        return [_Chunk(s, b[s:s + n], t[s:s + n], None, None) for s in range(0, b.numel(), n)]
    rows, k = view
    p = (b * k + t).tolist()
    chunks = []
    for s, c in _runs(p, n):
        b0, t0 = divmod(p[s], k)  # a run never crosses a sequence unless k == T
        chunks.append(_Chunk(s, b[s:s + c], t[s:s + c], rows[p[s]:p[s] + c], b0 * T + t0))
    return chunks


def _exp_shifted(x, shift, out):
    """out = exp(x - shift) in fp32 (x [n, V] any float dtype, shift [n, 1] fp32).

    x - shift first, so it is exact where it matters (x near shift); then exp2 of it times
    log2(e), which is faster than exp on CPU (SLEEF) and as accurate.
    """
    return torch.sub(x, shift, out=out).mul_(LOG2_E).exp2_()


def _row_lse(x, out):
    """x [n, V] any float dtype -> [n] fp32 log-sum-exp; out: fp32 [>= n, V] scratch (may be x)."""
    m = x.amax(1, keepdim=True).float()
    m.masked_fill_(m.isinf(), 0.0)  # rows of -inf: avoid inf - inf
    return _exp_shifted(x, m, out[:x.shape[0]]).sum(1).log_().add_(m.squeeze(1))


def _scratch(logits, chunks):
    rows = max([c.b.numel() for c in chunks], default=1)
    return torch.empty(rows, logits.shape[2], device=logits.device, dtype=torch.float32)


def _run_chunks(work, chunks, device, make_state=lambda: None, shared=False, parallel=True):
    """Call work(chunk, state) for every chunk; -> the states made, one per thread used.

    On CPU with several intra-op threads, the chunks are shared out to that many Python threads
    whose ops run single-threaded (torch releases the GIL inside ops; each worker sets OpenMP's
    thread count for itself only, the process keeps its own), each with its own state
    (scratch buffer, gradient accumulator). The alternative, every small op of every chunk a
    parallel region of its own, stalls badly (5x measured) when the cores are shared.
    shared=False: thread i does chunks i, i + threads, ... (a fixed split, so per-thread
    accumulators add up in the same order every run). shared=True: each thread takes the next
    chunk nobody has taken, so a thread whose core another process is using does fewer; only for
    work whose result does not depend on which thread does a chunk. parallel=False: all on the
    calling thread (the Triton interpreter is not thread-safe).
    """
    threads = min(torch.get_num_threads(), len(chunks))
    if device.type != "cpu" or threads <= 1 or not parallel:
        state = make_state()
        for c in chunks:
            work(c, state)
        return [state]
    queue, lock = iter(chunks), threading.Lock()

    def next_chunks(i):
        if not shared:
            yield from chunks[i::threads]
            return
        while True:
            with lock:
                c = next(queue, None)
            if c is None:
                return
            yield c

    def worker(i):
        _single_threaded_here()
        with torch.no_grad():  # grad mode is per thread; the chunks build no graph
            state = make_state()
            for c in next_chunks(i):
                work(c, state)
            return state

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(worker, range(threads)))


@functools.cache
def _omp_set_num_threads():
    """OpenMP's omp_set_num_threads (torch's intra-op threads), or None where it cannot be found."""
    try:
        return ctypes.CDLL(None).omp_set_num_threads
    except (OSError, AttributeError):
        return None


def _single_threaded_here():
    """Run torch's ops on the calling thread single-threaded, through OpenMP's setting for that
    thread alone: torch.set_num_threads would change every thread of the process."""
    torch.get_num_threads()  # torch gives a new thread its OpenMP count on first use: let it, then override
    set_threads = _omp_set_num_threads()
    if set_threads is not None:
        set_threads(1)


def torch_token_logprobs(logits, labels, ignore_index):
    """logits [B, T, V], labels [B, T] -> (b [N], t [N], token log-probs [N] fp32) for the N
    scored tokens (labels != ignore_index), in row-major order.

    Each chunk goes through torch's fused log_softmax (max, sum of exp, write: one row at a time,
    so the row stays in cache) into the fp32 scratch chunk; the label's entry is picked from it.
    """
    b, t = _scored_positions(labels, ignore_index)
    y = labels[b, t].long()
    token = torch.empty(b.numel(), device=logits.device, dtype=torch.float32)

    def work(c, buf):
        x, n = (c.x if c.x is not None else logits[c.b, c.t]), c.b.numel()
        logp = torch.log_softmax(x, 1, dtype=torch.float32, out=buf[:n])
        torch.gather(logp, 1, y[c.s:c.s + n, None], out=token[c.s:c.s + n, None])

    chunks = _chunks(logits, b, t)
    _run_chunks(work, chunks, logits.device, lambda: _scratch(logits, chunks), shared=True)
    return b, t, token


def _unscored_rows(B, T, b, t, n):
    """-> ranges of at most n consecutive rows of a [B * T, V] gradient with no scored token."""
    unscored = torch.ones(B * T, dtype=torch.bool)
    unscored[(b * T + t).cpu()] = False
    rows = unscored.nonzero().squeeze(1).tolist()
    return [range(rows[s], rows[s] + c) for s, c in _runs(rows, n)]


@functools.cache
def softmax_out_available() -> bool:
    """Whether the private `torch._softmax(x, dim, False, out=...)` runs (public softmax has no out=)."""
    x = torch.zeros(1, 2)
    try:
        torch._softmax(x, 1, False, out=torch.empty_like(x))
        return True
    except (AttributeError, TypeError, RuntimeError):
        return False


def _softmax_into(src, out):
    """out = softmax(src, dim=1), written straight into out where torch._softmax allows, else the
    same values through a temporary (older or newer torch without that private entry point)."""
    if softmax_out_available():
        return torch._softmax(src, 1, False, out=out)
    return out.copy_(torch.softmax(src, 1))


def torch_token_grad(logits, labels, b, t, g):
    """d(sum_i g[i] * logp_i) / d logits for the scored tokens (b, t) with weights g [N] (from
    torch_token_logprobs): [B, T, V] contiguous in the logits' dtype.

    Each row is written once, by the chunk threads: zeros for unscored tokens; g (onehot - softmax)
    for the others, the softmax recomputed by torch's fused kernel (row by row, like the forward),
    straight into the gradient for fp32 runs of consecutive rows, else through the fp32 scratch
    chunk.
    """
    B, T, V = logits.shape
    y = labels[b, t].long()
    grad = torch.empty(B * T, V, device=logits.device, dtype=logits.dtype)

    def work(c, buf):
        if isinstance(c, range):
            grad[c.start:c.stop].zero_()
            return
        n, x = c.b.numel(), (c.x if c.x is not None else logits[c.b, c.t])
        target = grad[c.grad_row:c.grad_row + n] if c.grad_row is not None else None
        out = target if target is not None and grad.dtype == torch.float32 else buf[:n]
        # CPU softmax has no half-to-fp32 variant: half chunks are widened into the scratch first.
        src = x if x.dtype == torch.float32 else out.copy_(x)
        g_c = g[c.s:c.s + n, None]
        _softmax_into(src, out).mul_(-g_c)
        out.scatter_add_(1, y[c.s:c.s + n, None], g_c)  # + g at the label: g (onehot - p)
        if target is None:
            grad.index_copy_(0, c.b * T + c.t, out.to(grad.dtype))
        elif out is not target:
            target.copy_(out)

    chunks = _chunks(logits, b, t)
    direct = grad.dtype == torch.float32 and all(c.grad_row is not None for c in chunks)
    zeros = _unscored_rows(B, T, b, t, _chunk_rows(logits))
    _run_chunks(work, zeros + chunks, logits.device,
                lambda: None if direct else _scratch(logits, chunks), shared=True)
    return grad.view(B, T, V)


def sequence_scale(labels, ignore_index, average):
    """[B] fp32: 1, or 1 / (scored tokens, at least 1) when averaging."""
    if not average:
        return torch.ones(labels.shape[0], device=labels.device, dtype=torch.float32)
    return 1.0 / (labels != ignore_index).sum(1).clamp(min=1).float()


def _scored_positions(labels, ignore_index):
    """-> (b [N], t [N]) int64 of the scored tokens, in row-major order."""
    b, t = (labels != ignore_index).nonzero(as_tuple=True)
    return b, t


class ChunkedSequenceLogprobs(torch.autograd.Function):
    """The torch path: saves the logits (a reference) and (b, t) per scored token."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, average):
        b, t, token = torch_token_logprobs(logits, labels, ignore_index)
        scale = sequence_scale(labels, ignore_index, average)
        # Per-sequence sums in float64: index_add_ adds in token order, and T fp32 additions in a
        # row would lose up to T * 6e-8 relative.
        out = torch.zeros(labels.shape[0], device=logits.device, dtype=torch.float64)
        out.index_add_(0, b, token.double())
        ctx.save_for_backward(logits, labels, b, t, scale)
        return out.float() * scale

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, b, t, scale = ctx.saved_tensors
        g = (grad_out.float() * scale)[b]
        return torch_token_grad(logits, labels, b, t, g), None, None, None


# ---------------------------------------------------------------------------------------------
# The fused head: logits = hidden @ weight.T, built chunk_tokens scored tokens at a time.
# ---------------------------------------------------------------------------------------------

_MM_FP32_OUTPUT = {}  # device type -> whether torch.mm(half, half, out_dtype=torch.float32) runs there


def mm_fp32_output(device) -> bool:
    """Whether torch.mm takes `out_dtype=torch.float32` for bf16 inputs on `device` (CUDA in torch
    releases that have it; not CPU): tried once per device type on 1 x 1 matrices."""
    kind = torch.device(device).type
    if kind not in _MM_FP32_OUTPUT:
        one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
        try:
            _MM_FP32_OUTPUT[kind] = torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):  # no such argument, or no kernel here
            _MM_FP32_OUTPUT[kind] = False
    return _MM_FP32_OUTPUT[kind]


def head_precision(device) -> str:
    """How the fused head makes fp32 logits from half weights on `device` (see the docstring)."""
    if mm_fp32_output(device):
        return "half inputs, fp32 accumulation and output (torch.mm out_dtype=float32)"
    return "fp32: the half head weight widened once per call (no half matmul with fp32 output here)"


def _mm_fp32(a, b):
    """a [n, k] @ b [k, m] -> fp32, accumulated and returned in fp32: half inputs through torch.mm's
    fp32 output where it runs, otherwise both widened first (never a half result widened after)."""
    if a.dtype == b.dtype == torch.float32:
        return a @ b
    if a.dtype == b.dtype and mm_fp32_output(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def head_logits(h, weight):
    """h [n, H], weight [V, H] -> logits [n, V] fp32. Split out so tests can watch the chunking."""
    return _mm_fp32(h, weight.t())


def _head_weight(weight, device):
    """The weight the chunks multiply by: a single fp32 copy of a half weight where no half matmul
    has an fp32 output (CPU; CUDA without torch.mm's out_dtype), the weight itself otherwise."""
    if weight.dtype != torch.float32 and not mm_fp32_output(device):
        return weight.float()
    return weight


def _hidden_grad(d, w):
    """d [n, V] fp32 @ w [V, H] -> [n, H] fp32, summed over blocks of HEAD_GRAD_BLOCK_V vocabulary
    rows: one fp32 dot product of length V = 32000 (as a single GEMM does it) is off by ~3e-5
    relative, more than the 1e-5 this op promises; block sums stay near 1e-6."""
    d = d.to(w.dtype)
    out = None
    for s in range(0, w.shape[0], HEAD_GRAD_BLOCK_V):
        part = _mm_fp32(d[:, s:s + HEAD_GRAD_BLOCK_V], w[s:s + HEAD_GRAD_BLOCK_V])
        out = part if out is None else out.add_(part)
    return out


def _token_chunks(count, chunk_tokens):
    return [slice(c0, min(c0 + chunk_tokens, count)) for c0 in range(0, count, chunk_tokens)]


def _fused_forward(hidden, weight, labels, b, t, chunk_tokens, kernels):
    """-> (token log-probs [N] fp32, lse [N] fp32) for the scored tokens at (b, t)."""
    w = _head_weight(weight, hidden.device)
    token = torch.empty(b.numel(), device=hidden.device, dtype=torch.float32)
    lse = torch.empty_like(token)

    def work(s, _):
        logits = head_logits(hidden[b[s], t[s]], w)  # [n, V] fp32, the chunk's only big buffer
        y = labels[b[s], t[s]]
        if kernels is not None:  # one pass: log-sum-exp and the label's logit
            token[s], lse[s] = kernels.rows_forward(logits, y)
            return
        x_y = logits.gather(1, y[:, None]).squeeze(1)
        lse_c = _row_lse(logits, logits)  # consumes the logits
        token[s], lse[s] = x_y - lse_c, lse_c

    _run_chunks(work, _token_chunks(b.numel(), chunk_tokens), hidden.device, parallel=kernels is None)
    return token, lse


def _fused_backward(ctx, hidden, weight, labels, b, t, lse, g_tok):
    """Recompute each chunk's logits; -> (grad hidden or None, grad weight or None)."""
    want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    w = _head_weight(weight, hidden.device)
    grad_h = torch.zeros_like(hidden) if want_h else None

    def work(s, grad_w):
        h, g, y = hidden[b[s], t[s]], g_tok[s], labels[b[s], t[s]]
        logits = head_logits(h, w)
        if ctx.kernels is not None:  # g (onehot - p), written once, over the logits
            d = ctx.kernels.rows_backward_(logits, y, lse[s], g)
        else:
            d = _exp_shifted(logits, lse[s, None], logits).mul_(-g[:, None])
            d[torch.arange(g.numel(), device=d.device), y] += g  # g (onehot - p)
        if want_h:
            grad_h[b[s], t[s]] = _hidden_grad(d, w).to(hidden.dtype)
        if want_w:
            grad_w.addmm_(d.t(), h.float())

    def accumulator():  # one per thread: fp32 [V, H]
        return torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if want_w else None

    accs = _run_chunks(work, _token_chunks(b.numel(), ctx.chunk_tokens), hidden.device, accumulator,
                       parallel=ctx.kernels is None)
    if not want_w:
        return grad_h, None
    for acc in accs[1:]:
        accs[0].add_(acc)
    return grad_h, accs[0].to(weight.dtype)


class FusedHeadLogprobs(torch.autograd.Function):
    """Head + log-prob over scored tokens; saves (b, t, lse) per scored token, nothing per chunk.
    `kernels`: minidpo.kernels.logprobs for the Triton chunk kernels, None for the torch ops."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, average, chunk_tokens, kernels):
        labels = labels.long()
        b, t = _scored_positions(labels, ignore_index)
        token, lse = _fused_forward(hidden, weight, labels, b, t, chunk_tokens, kernels)
        scale = sequence_scale(labels, ignore_index, average)
        out = torch.zeros(labels.shape[0], device=hidden.device, dtype=torch.float64)
        out.index_add_(0, b, token.double())  # float64 sums, as the torch path's
        ctx.save_for_backward(hidden, weight, labels, b, t, lse, scale)
        ctx.chunk_tokens, ctx.kernels = chunk_tokens, kernels
        return out.float() * scale

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, b, t, lse, scale = ctx.saved_tensors
        g_tok = (grad_out.float() * scale)[b]
        grad_h, grad_w = _fused_backward(ctx, hidden, weight, labels, b, t, lse, g_tok)
        return grad_h, grad_w, None, None, None, None, None


def default_chunk_tokens(vocab_size: int, device) -> int:
    """Tokens per fused-head chunk: DEFAULT_CHUNK_TOKENS on CPU; on CUDA as many as keep the fp32
    [n, V] chunk within GPU_CHUNK_BYTES, a multiple of 128 and at least 128."""
    if torch.device(device).type != "cuda":
        return DEFAULT_CHUNK_TOKENS
    return max(128, GPU_CHUNK_BYTES // (4 * vocab_size) // 128 * 128)


def _check_head_inputs(hidden, weight, labels, ignore_index, chunk_tokens):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.dtype not in LOGIT_DTYPES:
        raise ValueError(f"hidden must be a float32/bfloat16/float16 [B, T, H] tensor, got "
                         f"{_describe(hidden)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be [V, H={hidden.shape[2]}], got {_describe(weight)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match hidden "
                         f"({hidden.dtype}, {hidden.device})")
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    _check_labels(labels, (*hidden.shape[:2], weight.shape[0]), hidden.device, ignore_index, True)


def sequence_logprobs_from_hidden(hidden, weight, labels, *, ignore_index=IGNORE_INDEX, average=False,
                                  chunk_tokens=None, backend="auto"):
    """hidden [B, T, H], weight [V, H] (the LM head; same dtype), labels [B, T] -> [B] fp32.

    Equals sequence_logprobs(hidden @ weight.T, labels) without building the [B, T, V] logits:
    only scored tokens go through the head, chunk_tokens at a time (None: default_chunk_tokens
    for the device; fp32 logits for each chunk, accumulated in fp32), and backward recomputes
    each chunk. Each chunk's log-softmax takes `backend` ("auto": the Triton kernels on CUDA, the
    torch ops elsewhere; "triton" also on CPU under TRITON_INTERPRET=1). The gradient of hidden is
    computed always when hidden requires grad, that of weight only when weight does (accumulated
    in fp32). Extra memory, independent of B and T: one fp32 [chunk_tokens, V] chunk per worker
    (on CPU one worker per torch thread, on CUDA one), an fp32 copy of a half weight where
    `head_precision` says so, and an fp32 [V, H] accumulator per worker when weight requires grad.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_head_inputs(hidden, weight, labels, ignore_index, chunk_tokens)
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.shape[0], hidden.device)
    if backend == "auto":
        backend = "triton" if _triton_usable(hidden) else "torch"
    kernels = triton_kernels() if backend == "triton" else None
    return FusedHeadLogprobs.apply(hidden, weight, labels, ignore_index, average, chunk_tokens, kernels)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing elsewhere (CPU autocast is slower than fp32 there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_logprobs(model: nn.Module, input_ids, targets, *, attention=None, position_ids=None,
                   average: bool = False) -> torch.Tensor:
    """[len(targets) * B] fp32: for each [B, T'] target tensor (labels aligned with the model's
    outputs: position t scores targets[:, t]; T' <= T), its log-prob per row, concatenated.

    The one place that picks the path (see the table at the top): with a plain head the hidden
    states go straight through the fused head (in bf16 on CUDA, as autocast would run it; it
    accumulates in fp32 either way), else the [B, T, V] logits are built once and read in place.
    """
    fused = type(model.lm_head) is nn.Linear
    with autocast(input_ids.device):
        out = (model.hidden_states if fused else model)(input_ids, attention, position_ids)
    if not fused:
        return torch.cat([sequence_logprobs(out[:, :t.shape[1]], t, average=average) for t in targets])
    dtype = torch.bfloat16 if input_ids.device.type == "cuda" else out.dtype
    hidden, weight = out.to(dtype), model.head_weight().to(dtype)
    return torch.cat([sequence_logprobs_from_hidden(hidden[:, :t.shape[1]], weight, t, average=average)
                      for t in targets])
