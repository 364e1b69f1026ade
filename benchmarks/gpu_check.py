"""The one GPU check: run it on a machine with one CUDA GPU; it writes a markdown report.

    python benchmarks/gpu_check.py --out gpu_check.md        # on the GPU machine, under 8 minutes
    python benchmarks/gpu_check.py --cpu-smoke --out x.md    # anywhere: features and tiny CPU runs only

It needs only torch (and triton for the kernels) and this source tree: nothing is installed or
downloaded, no trl, and every newer API minidpo may use is detected, with the path taken reported.
Sections (each timed, each failure recorded in the report rather than ending the run):
  features    torch, triton, CUDA, the card; torch.mm(out_dtype=fp32) or the fp32 head weight;
              torch._softmax(out=) or its fallback; FlexAttention's signature; SDPA backends on.
  kernels     the Triton log-prob kernels and the fused head with Triton chunks (CUDA, compiled)
              against a float64 reference, fp32, bf16 and fp16, forward and gradients.
  attention   each attention path of the model at Mistral-7B's head shapes (32 query heads, 8 KV
              heads, head_dim 128) with the SDPA kernels the profiler saw: the expected ones are
                unshared rows (unpadded or right-padded): is_causal, no mask     -> flash (or cuDNN)
                packed rows (prefix sharing): two is_causal pieces, no mask      -> flash (or cuDNN)
                left-padded prefill: one is_causal call per pad count             -> flash (or cuDNN)
                decode step: one query, keys sliced, no mask                      -> flash / efficient
                a sliding window that binds: compiled FlexAttention               -> flex (Triton)
              and the math kernel (which materialises the scores) must appear on none of them.
  logprobs    benchmarks/bench_logprobs.py at B=8, T=1024, V=32000, bf16, H=4096: GB/s and the share
              of the memory roofline against naive and torch.compile(naive), the fused head.
  step        a Mistral-7B-shaped LoRA DPO step (random weights, bf16, r=16 on all projections),
              prefix sharing on and off: step time, tokens/s, peak memory against the --dry-run
              plan, the SDPA kernels (asserted not math).
  flex        the same step with FlexAttention for the packed rows, against the default, on batches
              of three widths: the graphs compiled after the first batch must be none.
"""
import argparse
import contextlib
import importlib
import inspect
import os
import platform
import random
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source tree without installing

from minidpo import logprobs as lp  # noqa: E402
from minidpo import model as M  # noqa: E402
from minidpo.data import TokenizedPair  # noqa: E402
from minidpo.lora import apply_lora  # noqa: E402

T = importlib.import_module("minidpo.train")
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, sliding_window=None)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
KERNELS = {"flash": "flash_attention", "efficient": "efficient_attention", "cudnn": "cudnn_attention",
           "math": "attention_math", "flex": None}  # SDPA kernels by a piece of their aten op's name


class Report:
    """Markdown sections written to disk after each one, so a run cut short keeps what it did."""

    def __init__(self, path: Path):
        self.path, self.parts = path, []

    def section(self, title: str, lines):
        self.parts.append(f"\n## {title}\n\n" + "\n".join(lines) + "\n")
        self.path.write_text("".join(self.parts))
        print(self.parts[-1], flush=True)

    def header(self, lines):
        self.parts.insert(0, "# minidpo GPU check\n\n" + "\n".join(lines) + "\n")
        self.path.write_text("".join(self.parts))


def table(head, rows):
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------
# features

def features(device):
    """-> rows (feature, available, path minidpo takes)."""
    rows = [("torch", torch.__version__, ""), ("python", platform.python_version(), "")]
    try:
        import triton

        rows.append(("triton", triton.__version__, "kernels: " + ("Triton" if device.type == "cuda" else
                                                                    "torch ops (no CUDA)")))
    except ImportError as e:
        rows.append(("triton", f"missing ({e})", "torch ops for every log-prob"))
    rows.append(("mm out_dtype=float32", lp.mm_fp32_output(device), lp.head_precision(device)))
    rows.append(("torch._softmax(out=)", lp.softmax_out_available(),
                 "written into the gradient" if lp.softmax_out_available() else "through a temporary"))
    from torch.nn.attention import flex_attention as fa

    params = inspect.signature(fa.flex_attention).parameters
    rows.append(("FlexAttention enable_gqa", "enable_gqa" in params,
                 "compiled, dynamic shapes" if device.type in M.FLEX_DEVICES else "eager (CPU: forward only)"))
    rows.append(("torch.compile(create_block_mask)", True, "block masks built compiled on CUDA"))
    if device.type == "cuda":
        backends = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
                    for name in ("flash", "mem_efficient", "math", "cudnn")
                    if hasattr(torch.backends.cuda, f"{name}_sdp_enabled")}
        rows.append(("SDPA backends enabled", ", ".join(k for k, v in backends.items() if v), ""))
    return rows


def card(device):
    if device.type != "cuda":
        return f"no CUDA device ({os.cpu_count()} CPU cores): the GPU checks did not run"
    p = torch.cuda.get_device_properties(device)
    return (f"card: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB; CUDA "
            f"{torch.version.cuda}; torch {torch.__version__}")


# ---------------------------------------------------------------------------------------------------
# kernels against float64

def _rel(got, want, normwise):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = (got - want).abs()
    scale = want.abs().max().clamp(min=1e-30) if normwise else want.abs().clamp(min=1e-30)
    return float((err / scale).max())


def check_kernels(device):
    tol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 2e-2), torch.float16: (1e-4, 2e-2)}
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for name, B, Tn, V, dtype in [("logits fp32, V=32002", 2, 256, 32002, torch.float32),
                                  ("logits bf16 shifted, V=32000", 4, 512, 32000, torch.bfloat16),
                                  ("logits fp16, V=50257", 4, 128, 50257, torch.float16)]:
        base = (torch.randn(B, Tn + 1, V, device=device, generator=gen) * 3).to(dtype).requires_grad_()
        labels = torch.randint(0, V, (B, Tn + 1), device=device, generator=gen)
        labels[torch.rand(B, Tn + 1, device=device, generator=gen) < 0.25] = -100
        w = torch.randn(B, device=device, generator=gen)
        out = lp.sequence_logprobs(base[:, :-1], labels[:, 1:], backend="triton")
        (out * w).sum().backward()
        b64 = base.detach().double().requires_grad_()
        ref = _reference(b64[:, :-1], labels[:, 1:])
        (ref * w.double()).sum().backward()
        rows.append(_verdict(name, _rel(out, ref, False), _rel(base.grad, b64.grad, True), tol[dtype]))
    for name, dtype in [("fused head bf16, H=1024, V=32000", torch.bfloat16), ("fused head fp32", torch.float32)]:
        hidden = torch.randn(4, 256, 1024, device=device, generator=gen).to(dtype).requires_grad_()
        weight = (torch.randn(32000, 1024, device=device, generator=gen) / 32).to(dtype).requires_grad_()
        labels = torch.randint(0, 32000, (4, 256), device=device, generator=gen)
        labels[:, :64] = -100
        out = lp.sequence_logprobs_from_hidden(hidden, weight, labels, backend="triton")
        out.sum().backward()
        h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        ref = _reference(h64 @ w64.t(), labels)
        ref.sum().backward()
        grad = max(_rel(hidden.grad, h64.grad, True), _rel(weight.grad, w64.grad, True))
        rows.append(_verdict(name, _rel(out, ref, False), grad, tol[dtype]))
    return table(["case", "forward rel err", "grad rel err (of max)", "tolerance fwd / grad", "verdict"], rows)


def _reference(logits, labels):
    scored = labels != -100
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * scored).sum(1)


def _verdict(name, fwd, grad, tol):
    ok = fwd <= tol[0] and grad <= tol[1]
    return (name, f"{fwd:.2e}", f"{grad:.2e}", f"{tol[0]:g} / {tol[1]:g}", "PASS" if ok else "**FAIL**")


# ---------------------------------------------------------------------------------------------------
# attention kernels per path

def kernels_seen(fn):
    """Run fn under the profiler; -> Counter of the SDPA kernels (KERNELS keys, from the aten ops
    the profiler saw) and of minidpo's FlexAttention calls ("flex")."""
    from torch.profiler import ProfilerActivity, profile

    from minidpo import prefix

    seen, real = Counter(), M.flex

    def counted(*args, **kwargs):
        seen["flex"] += 1
        return real(*args, **kwargs)

    with profile(activities=[ProfilerActivity.CPU]) as prof, _patched([(M, "flex", counted), (prefix, "flex", counted)]):
        fn()
        sync()
    for event in prof.events():
        name = event.name.lower()
        for kind, needle in KERNELS.items():
            if kind != "flex" and needle in name and name.startswith("aten::_scaled_dot_product"):
                seen[kind] += 1
    return seen


@contextlib.contextmanager
def _patched(items):
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in items]
    try:
        for obj, name, value in items:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def attention_verdict(seen, device, windowed):
    """FAIL on the math kernel anywhere; on CUDA a binding window must take FlexAttention and every
    other path flash or cuDNN attention."""
    if seen["math"]:
        return "**FAIL** (math kernel)"
    if device.type == "cuda":
        if windowed and not seen["flex"]:
            return "**FAIL** (no FlexAttention)"
        if not windowed and not (seen["flash"] or seen["cudnn"]):
            return "**FAIL** (neither flash nor cuDNN)"
    return "PASS"


def random_model(shape, device, dtype):
    """A Mistral of random weights made on the device (no host copy, nothing downloaded)."""
    with torch.device("meta"):
        net = M.Mistral(M.MistralConfig(**shape))
    net = net.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02)
    return net


def random_pairs(n, prompt, reply, vocab, seed=0, spread=0.25):
    """n pairs of random ids, lengths drawn within +-spread of prompt and reply."""
    rng = random.Random(seed)
    vary = lambda m: rng.randint(int((1 - spread) * m), int((1 + spread) * m))  # noqa: E731
    ids = lambda m: [rng.randrange(3, vocab) for _ in range(m)]  # noqa: E731
    return [TokenizedPair(ids(vary(prompt)), ids(vary(reply)), ids(vary(reply)), "check", i) for i in range(n)]


def check_attention(device, shape):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    net = random_model({**shape, "num_hidden_layers": 2}, device, dtype).eval()
    windowed = random_model({**shape, "num_hidden_layers": 2, "sliding_window": 64}, device, dtype).eval()
    pairs = random_pairs(4, 96, 64, shape["vocab_size"])
    unshared = T.make_batch(pairs, [0, 1, 2, 3], 0, device)
    packed = T.make_batch(pairs, [0, 1, 2, 3], 0, device, packed=True)
    ids = torch.randint(3, shape["vocab_size"], (3, 40), device=device)
    mask = torch.ones_like(ids)
    mask[0, :7], mask[2, :19] = 0, 0

    def generate():
        cache = net.new_cache(3, 41)
        net(ids, attention_mask=mask, cache=cache)
        net(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1] * 0 + 1], 1), cache=cache)

    paths = [("unshared rows (right-padded)", lambda: T.batch_logps(net, unshared)),
             ("packed rows (prefix sharing)", lambda: T.batch_logps(net, packed)),
             ("left-padded prefill + one decode step", generate),
             ("sliding window that binds (64), packed", lambda: T.batch_logps(windowed, packed))]
    rows = []
    for name, fn in paths:
        with torch.no_grad(), lp.autocast(device):
            fn()  # compile / warm up
            seen = kernels_seen(fn)
        rows.append((name, _kernels(seen), attention_verdict(seen, device, "window" in name)))
    return table(["path", "kernels seen", "verdict"], rows)


def _kernels(seen):
    return ", ".join(f"{k} x{v}" for k, v in sorted(seen.items()) if v) or "none seen"


# ---------------------------------------------------------------------------------------------------
# the DPO step

def dpo_steps(net, pairs, config, device, batches, steps, attention="sdpa"):
    """-> (median step s, tokens/s, peak bytes, kernels seen) over `steps` timed steps."""
    optimizer, scheduler = T.build_optimizer(net, config, 100)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    times, tokens = [], []

    def one(indices, step):
        batch = T.make_batch(pairs, indices, 0, device, packed=config.prefix_sharing, attention=attention)
        metrics = T.dpo_step(net, [batch], config, None)
        T.optimizer_step(params, optimizer, scheduler, metrics, config, step)
        return batch["tokens"]

    one(batches[0], 1)  # warm up (and compile)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for s in range(steps):
        sync()
        start = time.perf_counter()
        tokens.append(one(batches[(s + 1) % len(batches)], s + 2))
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    seen = kernels_seen(lambda: one(batches[0], steps + 2))
    del optimizer, scheduler, params
    order = sorted(range(len(times)), key=times.__getitem__)
    mid = order[len(order) // 2]
    return times[mid], tokens[mid] / times[mid], peak, seen


_STEP_MODELS = {}


def step_model(device, shape):
    """The LoRA model of the step sections, made once (a 7B model takes a while to make)."""
    key = (device.type, tuple(sorted(shape.items())))
    if key not in _STEP_MODELS:
        torch.manual_seed(0)
        net = random_model(shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        _STEP_MODELS[key] = apply_lora(net, r=16, alpha=32.0, dropout=0.05)
    return _STEP_MODELS[key].train()


def check_step(device, shape, pairs_per_batch, prompt, reply, steps):
    from minidpo.memory import memory_plan

    net = step_model(device, shape)
    max_length = prompt + reply  # every row exactly this long: the plan's worst case for unshared rows
    pairs = random_pairs(pairs_per_batch * (steps + 1), prompt, reply, shape["vocab_size"], spread=0)
    batches = [list(range(i, i + pairs_per_batch)) for i in range(0, len(pairs), pairs_per_batch)]
    rows = []
    for sharing in (True, False):
        config = T.TrainConfig(model="m", data=["d"], out="o", batch_size=pairs_per_batch, lr=1e-5,
                               max_length=max_length, prefix_sharing=sharing, device=device.type)
        step_s, tps, peak, seen = dpo_steps(net, pairs, config, device, batches, steps)
        plan = memory_plan(M.MistralConfig(**shape), config, device=device.type, threads=torch.get_num_threads())
        runtime = next((size for name, size, _ in plan.rows if name == "CUDA runtime"), 0)
        planned = (plan.peak - runtime) / 2**30
        kernels, verdict = _kernels(seen), attention_verdict(seen, device, False)
        rows.append(("shared" if sharing else "unshared", f"{step_s:.3f}", f"{tps:.0f}",
                     f"{peak / 2**30:.2f}" if peak else "-", f"{planned:.2f}", kernels, verdict))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    head = ["layout", "step s (median)", "tokens/s", "peak GiB (allocated)",
            "--dry-run plan GiB (without its CUDA runtime row)", "attention kernels", "verdict"]
    return [f"{pairs_per_batch} pairs per step, prompts of {prompt} and replies of {reply} tokens (max length "
            f"{max_length}: the plan's worst case for unshared rows; for packed ones it assumes a 0-token prompt), "
            f"{steps} timed steps after one warm-up; LoRA r=16 on q,k,v,o,gate,up,down, dropout 0.05; "
            f"reference: adapters off"] + [""] + table(head, rows)


def check_flex(device, shape, pairs_per_batch, steps):
    from torch._dynamo.utils import counters

    net = step_model(device, shape)
    pairs = []
    for width, seed in ((160, 1), (240, 2), (320, 3)):  # batches of three widths
        pairs += random_pairs(pairs_per_batch, width, width // 2, shape["vocab_size"], seed)
    batches = [list(range(i, i + pairs_per_batch)) for i in range(0, len(pairs), pairs_per_batch)]
    config = T.TrainConfig(model="m", data=["d"], out="o", batch_size=pairs_per_batch, lr=1e-5, max_length=640,
                           prefix_sharing=True, device=device.type)
    rows = []
    for attention in ("sdpa", "flex"):
        before = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        step_s, tps, peak, seen = dpo_steps(net, pairs, config, device, batches, steps, attention)
        graphs = counters["stats"]["unique_graphs"] - before
        rows.append((attention, f"{step_s:.3f}", f"{tps:.0f}", f"{peak / 2**30:.2f}" if peak else "-",
                     graphs, f"{time.perf_counter() - start:.0f}", _kernels(seen)))
    net.eval()  # no dropout: the two attentions must see the same numbers
    with torch.no_grad():
        batch = T.make_batch(pairs, batches[1], 0, device, packed=True)
        diff = (T.batch_logps(net, batch) - T.batch_logps(net, {**batch, "attention": "flex"})).abs().max()
    net.train()
    recompiles = counters["stats"]["unique_graphs"]
    return [f"packed rows of three widths, {steps} timed steps after one warm-up; graphs: torch.compile graphs "
            f"made during the run (flex: the attention and the block mask, then none for new widths); "
            f"max |log-prob difference| flex vs sdpa on one batch: {float(diff):.3g}; graphs in all: {recompiles}",
            ""] + table(["attention", "step s", "tokens/s", "peak GiB", "graphs compiled", "wall s (incl. compile)",
                         "attention kernels"], rows)


# ---------------------------------------------------------------------------------------------------
# bench_logprobs

def check_logprobs_bench(timeout):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_logprobs.py"), "--device", "cuda", "--B", "8",
           "--T", "1024", "--V", "32000", "--dtype", "bf16", "--H", "4096", "--prompt-frac", "0",
           "--repeats", "5", "--warmup", "2", "--providers", "naive,compile,triton,head_naive,head_triton,fused_head,fused_head_torch"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(("|", "B=", "goal"))]
    if done.returncode or not lines:
        return [f"bench_logprobs failed (rc {done.returncode}): {done.stderr.strip()[-800:]}"]
    return ["`" + " ".join(cmd[1:]) + "`", ""] + lines


def check_qlora_bench(timeout):
    """bench_qlora at Mistral-7B's shape (random weights built on the GPU): NF4 against bf16."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_qlora.py"), "--device", "cuda", "--shape-7b",
           "--bases", "bf16,nf4-bf16", "--pairs", "4", "--seq", "512", "--steps", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(("|", "goal", "frozen"))]
    if done.returncode or not lines:
        return [f"bench_qlora failed (rc {done.returncode}): {done.stderr.strip()[-800:]}"]
    return ["`" + " ".join(cmd[1:]) + "`", ""] + lines


# ---------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_check.md"), help="the markdown report")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU needed: features, and the attention and step sections on a tiny model on CPU")
    p.add_argument("--skip", nargs="*", default=[], choices=["kernels", "attention", "logprobs", "step", "flex", "qlora"])
    p.add_argument("--budget", type=float, default=450,
                   help="seconds; a section that would not fit in what is left is skipped")
    p.add_argument("--step-pairs", type=int, default=4, help="pairs per 7B step")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda and not args.cpu_smoke else "cpu")
    report = Report(Path(args.out))
    start = time.perf_counter()
    report.section("Features and the paths taken", table(["feature", "available", "path taken"], features(device)))
    if device.type != "cuda" and not args.cpu_smoke:
        report.header([card(device), "Run it with a CUDA GPU (or --cpu-smoke for the CPU parts)."])
        print(f"no CUDA device: wrote {args.out}; the GPU checks need one", file=sys.stderr)
        return 2
    shape = MISTRAL_7B if device.type == "cuda" else TINY
    on_gpu = device.type == "cuda"
    left = lambda: args.budget - (time.perf_counter() - start)  # noqa: E731
    sections = [  # (key, title, run, needs CUDA, seconds it is expected to take at most)
        ("kernels", "Triton kernels against float64 (CUDA, compiled)", lambda: check_kernels(device), True, 40),
        ("attention", "Attention kernels per path (Mistral-7B head shapes, 2 layers)",
         lambda: check_attention(device, shape), False, 90),
        ("step", "Mistral-7B-shaped LoRA DPO step, random weights, bf16" if on_gpu else "LoRA DPO step (tiny, CPU)",
         lambda: check_step(device, shape, args.step_pairs if on_gpu else 2, 256 if on_gpu else 12,
                            256 if on_gpu else 8, 3), False, 90),
        ("flex", "FlexAttention for packed rows against the default (SDPA pieces)",
         lambda: check_flex(device, shape, 2, 3), True, 150),
        ("logprobs", "bench_logprobs: B=8, T=1024, V=32000, bf16, head H=4096",
         lambda: check_logprobs_bench(max(60, left())), True, 120),
        ("qlora", "bench_qlora: LoRA DPO step on an NF4 base against bf16, Mistral-7B shape",
         lambda: check_qlora_bench(max(60, left())), True, 120),
    ]
    verdicts = []
    for key, title, run, needs_cuda, expected in sections:
        if key in args.skip:
            continue
        if needs_cuda and not on_gpu:
            report.section(title, ["not run: needs CUDA"])
            continue
        if expected > left():
            report.section(title, [f"not run: {left():.0f} s of the {args.budget:.0f} s budget left, "
                                   f"it takes up to {expected} s (--budget, --skip)"])
            verdicts.append((title, "skipped", "0"))
            continue
        t0 = time.perf_counter()
        try:
            lines = run()
        except Exception as e:  # record it and go on: one broken section must not hide the others
            lines = [f"**FAILED**: {type(e).__name__}: {e}", "", "```", traceback.format_exc()[-3000:], "```"]
        seconds = time.perf_counter() - t0
        verdicts.append((title, "FAIL" if any("FAIL" in ln for ln in lines) else "ok", f"{seconds:.0f}"))
        report.section(f"{title} ({seconds:.0f} s)", lines)
        if on_gpu:
            torch.cuda.empty_cache()
    report.header([card(device), f"total {time.perf_counter() - start:.0f} s", ""]
                  + table(["section", "verdict", "seconds"], verdicts))
    return 1 if any(v == "FAIL" for _, v, _ in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
