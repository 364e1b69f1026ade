"""sequence_logprobs (torch and Triton backends) and the fused head against a float64 reference.

The Triton kernels run on CPU under TRITON_INTERPRET=1, which must be set before triton is
imported: one subprocess (this file run as a script with --triton-worker) checks every case and
reports back as JSON, and each case is then its own pytest test here. With a GPU, more tests with
larger shapes are defined at the bottom.

Tolerances (issue 5): fp32 relative <= 1e-5; half-precision inputs <= 1e-4 on the forward, <= 2e-2
on gradients. Forward: per sequence, relative to the reference value (so a fully masked row must
be exactly 0). Gradients: relative to the largest reference entry of the tensor.
"""
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from minidpo import logprobs as lp

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("MINIDPO_TEST_SEED", "1234"))
FWD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Case:
    """One input configuration; `layout` says how the [B, T, V] logits view sits in memory."""
    name: str
    B: int = 3
    T: int = 7
    V: int = 1000
    dtype: str = "fp32"
    scale: float = 3.0           # logits = scale * randn
    layout: str = "contiguous"   # contiguous | shifted | vocab_strided | padded_rows | token_major
    ignore_index: int = -100
    average: bool = False
    masked_row: bool = False     # sequence 0 has no scored token
    block_v: int = None          # Triton only: force a small vocabulary block
    label_dtype: str = "int64"


CASES = [
    Case("fp32"),
    Case("fp32_block_remainder", V=1000, block_v=128),
    Case("fp32_vocab_32002", B=2, T=2, V=32002),
    Case("bf16_vocab_32002", B=2, T=2, V=32002, dtype="bf16", layout="shifted"),
    Case("fp32_T1", B=4, T=1, V=777),
    Case("fp32_masked_row", B=3, T=6, V=500, masked_row=True),
    Case("fp32_extreme_x50", V=2000, scale=50.0),
    Case("bf16_extreme_x50", V=2000, scale=50.0, dtype="bf16"),
    Case("bf16", dtype="bf16"),
    Case("fp16", dtype="fp16", masked_row=True),
    Case("fp32_shifted_view", layout="shifted"),
    Case("fp16_vocab_strided", dtype="fp16", layout="vocab_strided", block_v=256),
    Case("fp32_vocab_strided", layout="vocab_strided"),
    Case("bf16_padded_rows", dtype="bf16", layout="padded_rows"),
    Case("fp32_token_major", layout="token_major"),  # [T, B, V] memory, as seq-first models give
    Case("fp16_int32_labels", dtype="fp16", label_dtype="int32", layout="shifted"),
    Case("fp32_ignore_index_3", ignore_index=3),   # a real vocabulary id used as the ignore value
    Case("fp32_ignore_index_-1", ignore_index=-1, layout="shifted"),
    Case("fp32_average", average=True, masked_row=True),
    Case("bf16_average_shifted", dtype="bf16", average=True, layout="shifted"),
]


HEAD_CASES = [  # (name, B, T, H, V, dtype, chunk_tokens, weight requires grad, average)
    ("fp32", 3, 9, 32, 1000, "fp32", 4, True, False),
    ("fp32_frozen_head", 2, 5, 16, 32002, "fp32", 3, False, False),
    ("fp32_average_one_chunk", 3, 4, 16, 500, "fp32", 512, True, True),
    ("bf16", 3, 9, 32, 1000, "bf16", 5, True, False),
    ("fp16_T1", 4, 1, 16, 777, "fp16", 2, True, False),
]


# ---------------------------------------------------------------------------------------------
# Inputs, the float64 reference and the mismatch report
# ---------------------------------------------------------------------------------------------

def _view(base, layout, V):
    """The [B, T, V] logits view of `base` for a layout (never a copy)."""
    if layout == "shifted":
        return base[:, :-1]
    if layout == "vocab_strided":
        return base.transpose(1, 2)
    if layout == "padded_rows":
        return base[..., :V]
    if layout == "token_major":
        return base.transpose(0, 1)
    return base


def make_inputs(case, seed=SEED, device="cpu"):
    """-> (base leaf tensor, labels [B, T], upstream weights [B]) for a case, all random."""
    gen = torch.Generator().manual_seed(seed + sum(map(ord, case.name)))
    B, T, V = case.B, case.T, case.V
    shape = {"shifted": (B, T + 1, V), "vocab_strided": (B, V, T), "padded_rows": (B, T, V + 5),
             "token_major": (T, B, V)}
    base = torch.randn(shape.get(case.layout, (B, T, V)), generator=gen) * case.scale
    full = torch.randint(0, V, (B, T + 1), generator=gen)
    full[torch.rand(B, T + 1, generator=gen) < 0.25] = case.ignore_index
    if case.masked_row:
        full[0] = case.ignore_index
    labels = full[:, 1:] if case.layout == "shifted" else full[:, :T].contiguous()
    weights = torch.randn(B, generator=gen) + 0.5  # a different upstream gradient per sequence
    base = base.to(DTYPES[case.dtype]).to(device).requires_grad_()
    labels = labels.to(getattr(torch, case.label_dtype))
    return base, labels.to(device), weights.to(device)


def reference(logits, labels, ignore_index=-100, average=False):
    """float64 log_softmax + gather, the definition of the op."""
    scored = labels != ignore_index
    logp = torch.log_softmax(logits.double(), dim=-1)
    picked = logp.gather(-1, labels.masked_fill(~scored, 0).unsqueeze(-1)).squeeze(-1)
    total = (picked * scored).sum(1)
    return total / scored.sum(1).clamp(min=1) if average else total


def mismatch_report(what, got, want, rtol, normwise):
    """None when within tolerance, else a readable report of the worst entries."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    err = (got - want).abs()
    if not torch.isfinite(got).all():
        err = torch.where(torch.isfinite(got), err, torch.full_like(err, float("inf")))
    scale = want.abs().max().clamp(min=1e-30) if normwise else want.abs()
    bad = err > rtol * scale
    if not bad.any():
        return None
    rel = (err / scale).flatten()
    lines = [f"{what}: {int(bad.sum())}/{bad.numel()} entries over rtol={rtol:g} "
             f"({'relative to max |ref| = %.4g' % scale if normwise else 'elementwise'}); worst:"]
    for i in rel.topk(min(5, rel.numel())).indices.tolist():
        where = tuple(torch.unravel_index(torch.tensor(i), got.shape))
        idx = ", ".join(str(int(w)) for w in where)
        lines.append(f"  [{idx}] got {got.flatten()[i].item():.9g}  ref {want.flatten()[i].item():.9g}"
                     f"  rel err {rel[i].item():.3g}")
    return "\n".join(lines)


def check_case(case, run, seed=SEED, device="cpu"):
    """Run `run(logits, labels, case)` -> [B] forward and backward; -> list of mismatch reports."""
    base, labels, weights = make_inputs(case, seed, device)
    logits = _view(base, case.layout, case.V)
    out = run(logits, labels, case)
    (out * weights).sum().backward()
    base64 = base.detach().double().requires_grad_()
    want = reference(_view(base64, case.layout, case.V), labels, case.ignore_index, case.average)
    (want * weights.double()).sum().backward()
    dtype = DTYPES[case.dtype]
    reports = [
        None if out.dtype == torch.float32 else f"output dtype {out.dtype}, expected float32",
        None if base.grad.dtype == dtype else f"gradient dtype {base.grad.dtype}, expected {dtype}",
        mismatch_report(f"{case.name} forward", out, want, FWD_RTOL[dtype], normwise=False),
        mismatch_report(f"{case.name} gradient", base.grad, base64.grad, GRAD_RTOL[dtype], True),
    ]
    return [r for r in reports if r]


def run_torch(logits, labels, case):
    return lp.sequence_logprobs(logits, labels, ignore_index=case.ignore_index,
                                average=case.average, backend="torch")


def run_triton(logits, labels, case):
    return lp.triton_kernels().triton_sequence_logprobs(
        logits, labels, ignore_index=case.ignore_index, average=case.average, block_v=case.block_v)


# ---------------------------------------------------------------------------------------------
# The torch path
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_torch_backend_matches_float64_reference(case):
    reports = check_case(case, run_torch)
    assert not reports, "\n".join(reports)


TORCH_LARGE_CASES = [  # torch path only: the Triton interpreter would take minutes on these
    Case("fp32_vocab_32000_x50", B=2, T=24, V=32000, scale=50.0, layout="shifted"),
    Case("bf16_vocab_32000_average", B=2, T=24, V=32000, dtype="bf16", average=True),
]


@pytest.mark.parametrize("case", TORCH_LARGE_CASES, ids=lambda c: c.name)
def test_torch_backend_large_vocabulary_matches_float64_reference(case):
    """A full-size vocabulary: fp32 sums over 32000 entries per row, extreme logits."""
    reports = check_case(case, run_torch)
    assert not reports, "\n".join(reports)


def test_torch_backend_chunks_across_rows(monkeypatch):
    """Chunks smaller than a sequence, and rows split across chunk borders, still add up."""
    monkeypatch.setattr(lp, "CHUNK_ELEMENTS", 3 * 1000)  # 3 rows per chunk, T=7
    monkeypatch.setattr(lp, "CHUNK_FRACTION", 1)
    for case in (Case("chunk_contiguous"), Case("chunk_shifted", layout="shifted", dtype="bf16"),
                 Case("chunk_token_major", layout="token_major", dtype="fp16")):
        reports = check_case(case, run_torch)
        assert not reports, "\n".join(reports)


@pytest.mark.parametrize("layout", ["contiguous", "shifted", "vocab_strided", "padded_rows"])
def test_torch_path_reads_rows_in_place(layout, monkeypatch):
    """The torch path's chunks are views of the logits' own memory (no copy of the view), cover
    exactly the scored tokens, and row i of a chunk is logits[b[i], t[i]]."""
    monkeypatch.setattr(lp, "CHUNK_ELEMENTS", 3 * 40)  # at most 3 rows per chunk
    monkeypatch.setattr(lp, "CHUNK_FRACTION", 1)
    case = Case("rows", B=3, T=6, V=40, layout=layout)
    base, labels, _ = make_inputs(case)
    logits = _view(base.detach(), layout, case.V)
    chunks = lp._chunks(logits, *lp._scored_positions(labels, case.ignore_index))
    seen = [(int(b), int(t)) for c in chunks for b, t in zip(c.b, c.t)]
    assert seen == [tuple(p) for p in (labels != case.ignore_index).nonzero().tolist()]
    assert max(c.b.numel() for c in chunks) == 3
    starts = [sum(c.b.numel() for c in chunks[:i]) for i in range(len(chunks))]
    assert [c.s for c in chunks] == starts  # c.s: index of the chunk's first token among all scored
    for c in chunks:
        assert c.x is not None and 1 <= c.x.shape[0] <= 3
        assert c.x.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        for i, (b, t) in enumerate(zip(c.b.tolist(), c.t.tolist())):
            assert c.x[i].data_ptr() == logits[b, t].data_ptr()
            assert c.grad_row + i == b * case.T + t


def test_torch_path_falls_back_for_token_major_logits():
    base = torch.randn(5, 3, 40)
    assert lp._as_rows(base.transpose(0, 1)) is None  # covered by the token_major cases


def test_torch_path_threads_give_identical_results():
    """The CPU thread pool (chunks shared out to threads) matches one thread bit for bit, and
    leaves torch's thread count as it found it."""
    before = torch.get_num_threads()
    results = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        try:
            base, labels, weights = make_inputs(Case("threads", B=4, T=9, V=3000, layout="shifted"))
            out = lp.sequence_logprobs(base[:, :-1], labels, backend="torch")
            (out * weights).sum().backward()
            assert torch.get_num_threads() == threads
            results.append((out, base.grad))
        finally:
            torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "token_major"])
def test_torch_path_writes_every_gradient_row(dtype, layout, monkeypatch):
    """Fresh buffers full of NaN (as reused memory may be): the gradient must still match, so
    every row, unscored ones (zeros, written by the chunk threads) included, is written."""
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    monkeypatch.setattr(lp, "CHUNK_ELEMENTS", 2 * 300)  # several chunks and zero runs per thread
    monkeypatch.setattr(lp, "CHUNK_FRACTION", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the chunk threads, which also write the zero rows
    try:
        case = Case(f"poisoned_{dtype}_{layout}", B=3, T=9, V=300, dtype=dtype, layout=layout,
                    masked_row=True)
        reports = check_case(case, run_torch)
    finally:
        torch.set_num_threads(before)
    assert not reports, "\n".join(reports)


def test_unscored_rows_cover_exactly_the_rows_without_a_scored_token():
    labels = torch.tensor([[5, -100, -100, 7], [-100, -100, -100, -100], [1, 2, -100, 3]])
    b, t = lp._scored_positions(labels, -100)
    ranges = lp._unscored_rows(3, 4, b, t, n=3)
    assert ranges == [range(1, 3), range(4, 7), range(7, 8), range(10, 11)]


def test_shared_chunk_queue_runs_every_chunk_once_on_each_thread_count():
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            done, lock = [], threading.Lock()

            def work(c, state):
                with lock:
                    done.append(c)
                state.append(c)

            states = lp._run_chunks(work, list(range(50)), torch.device("cpu"), list, shared=True)
            assert sorted(done) == list(range(50)) and len(states) == threads
            assert sorted(c for s in states for c in s) == list(range(50))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_auto_backend_on_cpu_is_the_torch_path():
    base, labels, _ = make_inputs(Case("auto"))
    a = lp.sequence_logprobs(base, labels)
    b = lp.sequence_logprobs(base, labels, backend="torch")
    assert torch.equal(a, b)


def test_empty_sequences_give_zeros():
    logits = torch.randn(2, 0, 50, requires_grad=True)
    labels = torch.zeros(2, 0, dtype=torch.long)
    out = lp.sequence_logprobs(logits, labels, backend="torch")
    out.sum().backward()
    assert torch.equal(out, torch.zeros(2)) and logits.grad.shape == logits.shape
    hidden = torch.randn(2, 0, 8, requires_grad=True)
    out = lp.sequence_logprobs_from_hidden(hidden, torch.randn(50, 8), labels)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(2)) and hidden.grad.shape == hidden.shape


def test_no_grad_forward_matches():
    base, labels, _ = make_inputs(Case("nograd", dtype="bf16"))
    with torch.no_grad():
        out = lp.sequence_logprobs(base, labels, backend="torch")
    report = mismatch_report("no_grad forward", out, reference(base, labels), 1e-4, False)
    assert report is None, report


# ---------------------------------------------------------------------------------------------
# The Triton path, under TRITON_INTERPRET=1 in one subprocess
# ---------------------------------------------------------------------------------------------

def _triton_extra_checks():
    """Triton-only checks run inside the interpreter worker: -> {name: [reports]}."""
    K = lp.triton_kernels()
    results = {"triton_is_interpreted": [] if K.INTERPRETED else ["kernels were not interpreted"]}
    base, labels, _ = make_inputs(Case("saved", layout="shifted"))
    view = base[:, :-1]
    out = lp.sequence_logprobs(view, labels, backend="triton")
    saved = out.grad_fn.saved_tensors[0]
    same = saved.data_ptr() == view.data_ptr() and saved.stride() == view.stride()
    results["triton_saves_the_view_not_a_copy"] = [] if same else [
        f"saved logits {saved.data_ptr()} {saved.stride()} vs view {view.data_ptr()} {view.stride()}"]
    labels = labels.clone()
    labels[1, 2] = 1000 + 5  # out of the vocabulary, with the host check turned off
    K.CHECK_LABELS = False
    try:
        out = lp.sequence_logprobs(view.detach(), labels, backend="triton")
    finally:
        K.CHECK_LABELS = True
    ok = torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    results["triton_unchecked_bad_label_gives_nan"] = [] if ok else [f"got {out.tolist()}"]
    empty = torch.randn(2, 0, 50, requires_grad=True)
    out = lp.sequence_logprobs(empty, torch.zeros(2, 0, dtype=torch.long), backend="triton")
    out.sum().backward()
    ok = torch.equal(out, torch.zeros(2)) and empty.grad.shape == empty.shape
    results["triton_empty_sequences"] = [] if ok else [f"got {out.tolist()}"]
    return results


def triton_worker():
    """Entry point of the subprocess: check every case on the Triton path, print JSON."""
    results = {}
    for case in CASES:
        try:
            results[case.name] = check_case(case, run_triton)
        except Exception as e:  # report it on the case's own test instead of killing the worker
            results[case.name] = [f"{type(e).__name__}: {e}"]
    for case in HEAD_CASES:  # the fused head with the Triton chunk kernels
        try:
            results["head_" + case[0]] = check_head_case(case, backend="triton")
        except Exception as e:
            results["head_" + case[0]] = [f"{type(e).__name__}: {e}"]
    results.update(_triton_extra_checks())
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def triton_results():
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, "--triton-worker"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"worker failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


TRITON_EXTRA = ["triton_is_interpreted", "triton_saves_the_view_not_a_copy",
                "triton_unchecked_bad_label_gives_nan", "triton_empty_sequences"]


@pytest.mark.parametrize("name", [c.name for c in CASES] + TRITON_EXTRA + ["head_" + c[0] for c in HEAD_CASES])
def test_triton_interpreted(triton_results, name):
    assert name in triton_results, f"the worker did not report {name}"
    assert not triton_results[name], "\n".join(triton_results[name])


class _RecordingKernel:
    """Stands in for a @triton.jit kernel and records the arguments of its launch."""

    def __init__(self):
        self.args = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.args = args
        return launch


def test_triton_launcher_passes_the_view_and_its_strides(monkeypatch):
    """No copy before the launch: the kernel gets the view's own pointer and strides."""
    K = lp.triton_kernels()
    kernel = _RecordingKernel()
    monkeypatch.setattr(K, "_logprobs_fwd_kernel", kernel)
    monkeypatch.setattr(K, "INTERPRETED", True)  # allow CPU tensors for this dry launch
    base = torch.randn(2, 5, 7, 300)[:, :, 3]  # [2, 5, 300], rows 7 * 300 apart
    view = base[:, :-1]
    labels = torch.randint(0, 300, (2, 5))[:, 1:]
    K.logprobs_forward(view, labels)
    logits_arg, labels_arg = kernel.args[0], kernel.args[1]
    assert logits_arg is view and labels_arg is labels
    assert tuple(kernel.args[6:11]) == view.stride() + labels.stride()


def test_triton_backend_on_cpu_without_interpreter_raises():
    base, labels, _ = make_inputs(Case("cpu"))
    K = lp.triton_kernels()
    if K.INTERPRETED:  # this process imported triton with TRITON_INTERPRET=1 set by the user
        return
    with pytest.raises(ValueError, match="CUDA tensors"):
        lp.sequence_logprobs(base, labels, backend="triton")


def test_import_without_triton_falls_back_to_torch():
    script = (
        "import sys, torch; sys.modules['triton'] = None\n"
        "from minidpo.logprobs import sequence_logprobs\n"
        "x = torch.randn(2, 3, 50); y = torch.randint(0, 50, (2, 3))\n"
        "assert torch.equal(sequence_logprobs(x, y), sequence_logprobs(x, y, backend='torch'))\n"
        "try:\n    sequence_logprobs(x, y, backend='triton')\n"
        "except RuntimeError as e:\n    print('ERROR', e)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERROR backend='triton' is unavailable" in proc.stdout and "triton" in proc.stdout


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def _bad_inputs():
    x, y = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    too_big, negative = y.clone(), y.clone()
    too_big[1, 2], negative[0, 1] = 10, -5
    cases = [
        ("label 10 outside", x, too_big, r"labels\[1, 2\] = 10 is outside the vocabulary \[0, 10\)"),
        ("negative label", x, negative, r"labels\[0, 1\] = -5 is outside"),
        ("labels shape", x, y[:, :2], r"labels \(2, 2\) must be \[B, T\] of logits \(2, 3, 10\)"),
        ("integer logits", x.long(), y, "logits must be float32, bfloat16 or float16"),
        ("float64 logits", x.double(), y, "logits must be float32, bfloat16 or float16"),
        ("2-d logits", x[0], y, r"logits must be a \[B, T, V\] tensor"),
        ("float labels", x, y.float(), "labels must be an integer tensor"),
        ("bool labels", x, y > 3, "labels must be an integer tensor"),
        ("empty vocabulary", x[..., :0], y, "empty vocabulary"),
    ]
    return [pytest.param(*c[1:], id=c[0]) for c in cases]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("logits,labels,message", _bad_inputs())
def test_bad_input_raises(backend, logits, labels, message):
    with pytest.raises(ValueError, match=message):
        lp.sequence_logprobs(logits, labels, backend=backend)


def test_bad_backend_and_fused_head_inputs():
    x, y = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        lp.sequence_logprobs(x, y, backend="cuda")
    h, w = torch.randn(2, 3, 8), torch.randn(10, 8)
    bad = y.clone()
    bad[0, 0] = 10
    with pytest.raises(ValueError, match=r"labels\[0, 0\] = 10 is outside"):
        lp.sequence_logprobs_from_hidden(h, w, bad)
    with pytest.raises(ValueError, match=r"weight must be \[V, H=8\]"):
        lp.sequence_logprobs_from_hidden(h, w[:, :4], y)
    with pytest.raises(ValueError, match="must match hidden"):
        lp.sequence_logprobs_from_hidden(h, w.bfloat16(), y)
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        lp.sequence_logprobs_from_hidden(h, w, y, chunk_tokens=0)
    with pytest.raises(ValueError, match="hidden must be"):
        lp.sequence_logprobs_from_hidden(h.long(), w, y)


# ---------------------------------------------------------------------------------------------
# The fused head
# ---------------------------------------------------------------------------------------------



def _head_inputs(B, T, H, V, dtype, seed=SEED):
    gen = torch.Generator().manual_seed(seed + B * 1000 + T * 10 + H + V)
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H ** 0.5 * 3
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[torch.rand(B, T, generator=gen) < 0.3] = -100
    if B > 1:
        labels[0] = -100  # a fully masked sequence
    return hidden.to(DTYPES[dtype]), weight.to(DTYPES[dtype]), labels, torch.randn(B, generator=gen)


def check_head_case(case, seed=SEED, device="cpu", backend="auto"):
    """Fused head forward and gradients vs float64 hidden @ weight.T; -> list of mismatch reports."""
    name, B, T, H, V, dtype, chunk, train_head, average = case
    hidden, weight, labels, weights = (x.to(device) for x in _head_inputs(B, T, H, V, dtype, seed))
    hidden.requires_grad_()
    weight.requires_grad_(train_head)
    out = lp.sequence_logprobs_from_hidden(hidden, weight, labels, chunk_tokens=chunk,
                                           average=average, backend=backend)
    (out * weights).sum().backward()
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    want = reference(h64 @ w64.t(), labels, average=average)
    (want * weights.double()).sum().backward()
    rtol, grad_rtol = FWD_RTOL[DTYPES[dtype]], GRAD_RTOL[DTYPES[dtype]]
    reports = [mismatch_report(f"{name} forward", out, want, rtol, False),
               mismatch_report(f"{name} grad hidden", hidden.grad, h64.grad, grad_rtol, True)]
    if train_head:
        reports.append(mismatch_report(f"{name} grad weight", weight.grad, w64.grad, grad_rtol, True))
    else:
        reports.append(None if weight.grad is None else "frozen weight received a gradient")
    return [r for r in reports if r]


@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: c[0])
def test_fused_head_matches_float64_reference(case):
    reports = check_head_case(case)
    assert not reports, "\n".join(reports)


def test_fused_head_builds_only_chunks_of_scored_tokens(monkeypatch):
    """One long sequence never builds its full logits: every head call has <= chunk_tokens rows,
    and only scored tokens go through the head (once forward, once more in backward)."""
    calls = []
    real = lp.head_logits

    def spy(h, weight):
        calls.append(h.shape[0])
        return real(h, weight)

    monkeypatch.setattr(lp, "head_logits", spy)
    hidden, weight, labels, _ = _head_inputs(1, 300, 16, 200, "fp32")
    labels[0, :100] = -100  # a long prompt
    hidden.requires_grad_()
    out = lp.sequence_logprobs_from_hidden(hidden, weight, labels, chunk_tokens=32)
    scored = int((labels != -100).sum())
    assert max(calls) <= 32 and sum(calls) == scored, calls
    out.sum().backward()
    assert max(calls) <= 32 and sum(calls) == 2 * scored, calls
    assert hidden.grad[labels == -100].abs().max() == 0


def test_fused_head_equals_unfused_torch_path():
    hidden, weight, labels, _ = _head_inputs(2, 6, 16, 300, "fp32")
    fused = lp.sequence_logprobs_from_hidden(hidden, weight, labels, chunk_tokens=5)
    unfused = lp.sequence_logprobs(hidden @ weight.t(), labels, backend="torch")
    report = mismatch_report("fused vs unfused", fused, unfused, 1e-5, False)
    assert report is None, report


def test_fused_head_auto_runs_the_triton_chunks_where_triton_is_usable(monkeypatch):
    """Where Triton is usable (CUDA), backend="auto" sends every chunk through rows_forward and
    rows_backward_ (stood in for here by torch with the kernels' contracts), nothing else."""
    calls = []

    class Kernels:
        @staticmethod
        def rows_forward(x, y):
            calls.append(("forward", x.shape[0], x.dtype))
            lse = torch.logsumexp(x, 1)
            return x.gather(1, y[:, None]).squeeze(1) - lse, lse

        @staticmethod
        def rows_backward_(x, y, lse, g):
            calls.append(("backward", x.shape[0], x.dtype))
            x.sub_(lse[:, None]).exp_().mul_(-g[:, None])
            x[torch.arange(len(y)), y] += g
            return x

    monkeypatch.setattr(lp, "_triton_usable", lambda t: True)
    monkeypatch.setattr(lp, "triton_kernels", lambda: Kernels)
    case = ("auto", 3, 9, 32, 1000, "fp32", 4, True, False)
    reports = check_head_case(case)
    assert not reports, "\n".join(reports)
    scored = int((_head_inputs(*case[1:6])[2] != -100).sum())
    for kind in ("forward", "backward"):
        rows = [n for k, n, dtype in calls if k == kind and dtype == torch.float32]
        assert sum(rows) == scored and max(rows) <= 4, calls


def test_default_chunk_tokens_per_device():
    assert lp.default_chunk_tokens(32000, "cpu") == lp.DEFAULT_CHUNK_TOKENS == 512
    assert lp.default_chunk_tokens(32000, "cuda") == 2048  # 256 MiB of fp32 logits
    assert lp.default_chunk_tokens(128256, "cuda") == 512
    assert lp.default_chunk_tokens(10 ** 7, "cuda") == 128


def test_half_head_without_fp32_output_matmul_widens_never_rounds(monkeypatch):
    """Where no half matmul gives fp32 output (CPU here; CUDA on an older torch), the head weight
    is widened to fp32 once and the chunk multiplied in fp32: the logits equal the fp32 product
    exactly, not the half product rounded (~1e-2 off per logit) and widened afterwards."""
    assert not lp.mm_fp32_output("cpu") and "widened" in lp.head_precision("cpu")
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(16, 64, generator=gen).bfloat16(), (torch.randn(500, 64, generator=gen) * 3).bfloat16()
    wide = lp._head_weight(w, h.device)
    assert wide.dtype == torch.float32
    got = lp.head_logits(h, wide)
    assert got.dtype == torch.float32 and torch.equal(got, h.float() @ w.float().t())
    rounded = (h.float() @ w.float().t()).bfloat16().float()
    assert (rounded - got).abs().max() > 1e-3  # what a half round trip would have lost
    monkeypatch.setitem(lp._MM_FP32_OUTPUT, "cpu", True)  # as on CUDA with torch.mm(out_dtype=)
    assert lp._head_weight(w, h.device) is w and "torch.mm out_dtype" in lp.head_precision("cpu")


def test_torch_path_without_the_private_softmax_out_is_the_same(monkeypatch):
    """The fallback for a torch without `torch._softmax(..., out=)` gives the same gradient."""
    case = Case("softmax_fallback", B=3, T=7, V=500, layout="shifted")
    assert lp.softmax_out_available()
    base, labels, weights = make_inputs(case)
    lp.sequence_logprobs(base[:, :-1], labels, backend="torch").mul(weights).sum().backward()
    monkeypatch.setattr(lp, "softmax_out_available", lambda: False)
    again = base.detach().clone().requires_grad_()
    lp.sequence_logprobs(again[:, :-1], labels, backend="torch").mul(weights).sum().backward()
    assert torch.equal(again.grad, base.grad)


def test_chunk_threads_leave_the_process_thread_count_alone():
    """The chunk workers run their own ops single-threaded (OpenMP's per-thread count) while the
    process's setting, which any other thread starting meanwhile reads, stays as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    worker, other = [], []
    try:
        def work(c, state):
            worker.append(torch.get_num_threads())
            t = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
            t.start()
            t.join()

        lp._run_chunks(work, list(range(4)), torch.device("cpu"), shared=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert other == [2] * 4, other
    if lp._omp_set_num_threads() is not None:
        assert worker == [1] * 4, worker


# ---------------------------------------------------------------------------------------------
# Extra memory, measured as peak resident memory in a fresh process (Linux /proc)
# ---------------------------------------------------------------------------------------------

MEMORY_SCRIPT = """
import json, torch
from minidpo.logprobs import sequence_logprobs, sequence_logprobs_from_hidden

def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

def extra_peak(fn, leaf):
    fn()  # warm up, then drop what it returned
    leaf.grad = None
    base = rss('VmRSS:')
    open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current size
    fn()
    return rss('VmHWM:') - base

torch.manual_seed(0)
B, T, V, H = 4, 128, 16000, 32
logits = torch.randn(B, T, V, requires_grad=True)  # 32 MiB
labels = torch.randint(0, V, (B, T))
hidden = torch.randn(2, 512, H, requires_grad=True)  # its logits would be 64 MiB
weight = torch.randn(V, H)
head_labels = torch.randint(0, V, (2, 512))

def torch_fwd():
    with torch.no_grad():
        sequence_logprobs(logits, labels, backend='torch')

def torch_fwd_bwd():
    sequence_logprobs(logits, labels, backend='torch').sum().backward()

def head_fwd_bwd():
    sequence_logprobs_from_hidden(hidden, weight, head_labels, chunk_tokens=64).sum().backward()

print(json.dumps({'logits': logits.numel() * 4, 'head_logits': 2 * 512 * V * 4,
                  'torch_fwd': extra_peak(torch_fwd, logits),
                  'torch_fwd_bwd': extra_peak(torch_fwd_bwd, logits),
                  'head': extra_peak(head_fwd_bwd, hidden)}))
"""


def test_extra_memory_is_a_small_fraction_of_the_logits():
    """Peak resident memory above the inputs, in a fresh process. glibc is told to map every
    buffer of 64 KiB or more on its own, so a freed buffer leaves the resident set at once."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    # Forward: one 1 MiB chunk per thread plus per-token scalars. Forward + backward: the gradient
    # itself (1x the logits) plus the same. The fused head: [64, 16000] fp32 chunks (4 MiB each).
    assert m["torch_fwd"] < 0.25 * m["logits"], m
    assert m["torch_fwd_bwd"] < 1.25 * m["logits"], m
    assert m["head"] < 0.25 * m["head_logits"], m


# ---------------------------------------------------------------------------------------------
# Larger shapes on a GPU (defined only when one is present)
# ---------------------------------------------------------------------------------------------

if torch.cuda.is_available():
    GPU_CASES = [
        Case("gpu_bf16_shifted", B=4, T=512, V=32000, dtype="bf16", layout="shifted"),
        Case("gpu_fp32", B=2, T=256, V=32002, masked_row=True),
        Case("gpu_fp16_average", B=4, T=128, V=50257, dtype="fp16", average=True),
        Case("gpu_bf16_extreme", B=2, T=64, V=32000, dtype="bf16", scale=50.0),
    ]

    @pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
    @pytest.mark.parametrize("backend", ["triton", "torch"])
    def test_gpu_large_shapes(case, backend):
        reports = check_case(case, run_triton if backend == "triton" else run_torch, device="cuda")
        assert not reports, "\n".join(reports)

    GPU_HEAD_CASES = [("gpu_fp32", 2, 512, 256, 32000, "fp32", 128, True, False),
                      ("gpu_bf16_frozen", 4, 512, 1024, 32000, "bf16", 256, False, False),
                      ("gpu_bf16_average", 2, 256, 512, 32002, "bf16", 100, True, True)]

    @pytest.mark.parametrize("case", GPU_HEAD_CASES, ids=lambda c: c[0])
    def test_gpu_fused_head(case):
        reports = check_head_case(case, device="cuda")
        assert not reports, "\n".join(reports)


if __name__ == "__main__" and "--triton-worker" in sys.argv:
    triton_worker()
