"""Benchmark per-sequence log-probs: naive, torch.compile(naive), minidpo torch and triton, fused head.

    python benchmarks/bench_logprobs.py                  # B=8 T=512 V=32000 fp32 H=256 on CPU
    python benchmarks/bench_logprobs.py --quick          # B=2 T=128 V=8000 H=64, 3 repeats, ~1 min
    python benchmarks/bench_logprobs.py --B 2 --T 256 --V 16000 --H 128 --dtype bf16 --repeats 5
    python benchmarks/bench_logprobs.py --device cuda --T 1024 --dtype bf16 --H 4096 --prompt-frac 0

Providers (`--providers`, comma separated). Group "logits" works on given logits [B, T, V]:
naive (`log_softmax(logits.float())` + gather), compile (torch.compile of naive), torch
(sequence_logprobs backend="torch"), triton (backend="triton", CUDA only). Group "head" starts from
hidden [B, T, H] and the head weight [V, H]: head_naive (hidden @ weight.T, then naive: the
logits-materialising path), head_torch and head_triton (hidden @ weight.T, then minidpo's torch or
triton backend; triton on CUDA only), fused_head (sequence_logprobs_from_hidden: on CUDA each
chunk through the Triton kernels) and fused_head_torch (the same with torch ops per chunk; CUDA
only, on CPU it is fused_head). Ratios compare each provider with its group's first one.
Labels: the first --prompt-frac of each sequence is ignore_index (a DPO prompt), the rest random.

Method. Threads: every provider runs with the same torch.get_num_threads() (--threads; default
torch's own, one per core), and the table header says how many, with the load average before the
run. Time: all providers in one fresh subprocess; each gets --warmup untimed runs
(torch.compile compiles there), then --repeats rounds in which every provider runs once, so a
change in the machine's load between rounds hits all alike. A run is a forward (building the
graph) and a backward (upstream gradient: random per sequence), each timed on its own (CUDA:
synchronized); the table gives the median and the spread [min-max].
Extra peak memory: each provider alone in a fresh subprocess. The inputs are built first and one
warm-up run is done; the peak is what one more run adds on top of that, gradients included.
  CPU: from /proc/self/status. The memory subprocess runs with MALLOC_MMAP_THRESHOLD_=65536, so
  glibc maps every buffer of 64 KiB or more on its own and a freed buffer leaves the resident set
  at once (otherwise freed memory kept in glibc's heap would sit in the baseline). Baseline: VmRSS
  with gradients dropped; `echo 5 > /proc/self/clear_refs` resets the high-water mark VmHWM to
  the current size; one run; peak = VmHWM - baseline.
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the memory
  allocated before the run.
Both are measured for forward+backward and for a forward under torch.no_grad() (the reference pass).
On CUDA the table adds GB/s (forward reads the logits once; backward reads them and writes the
gradient) and the share of the card's memory bandwidth (spec sheet numbers below).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source tree without installing

from minidpo.logprobs import sequence_logprobs, sequence_logprobs_from_hidden  # noqa: E402

PROVIDERS = {  # name -> group
    "naive": "logits", "compile": "logits", "torch": "logits", "triton": "logits",
    "head_naive": "head", "head_torch": "head", "head_triton": "head", "fused_head": "head",
    "fused_head_torch": "head",
}
CUDA_ONLY = ("triton", "head_triton", "fused_head_torch")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Memory bandwidth from the vendors' spec sheets, bytes/s, by a substring of the device name.
PEAK_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12,
                  "A100": 1.555e12, "L40S": 0.864e12, "A10G": 0.6e12, "4090": 1.008e12}
IGNORE = -100


def naive(logits, labels, ignore_index=IGNORE):
    """The textbook path: fp32 log_softmax of the whole tensor, then gather."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = labels != ignore_index
    picked = logp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def make_inputs(args, group, device):
    """-> dict of leaf tensors (requires_grad where they get a gradient), labels and upstream grad."""
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    labels = torch.randint(0, args.V, (args.B, args.T), device=device)
    labels[:, :int(args.T * args.prompt_frac)] = IGNORE
    upstream = torch.randn(args.B, device=device)
    if group == "logits":
        logits = torch.randn(args.B, args.T, args.V, device=device, dtype=dtype) * 2
        return {"logits": logits.requires_grad_(), "labels": labels, "upstream": upstream}
    hidden = torch.randn(args.B, args.T, args.H, device=device, dtype=dtype)
    weight = torch.randn(args.V, args.H, device=device, dtype=dtype) * args.H ** -0.5
    return {"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(args.train_head),
            "labels": labels, "upstream": upstream}


def make_forward(name, args):
    """-> f(inputs) -> [B] fp32 for a provider."""
    if name == "naive":
        return lambda x: naive(x["logits"], x["labels"])
    if name == "compile":
        compiled = torch.compile(naive)
        return lambda x: compiled(x["logits"], x["labels"])
    if name in ("torch", "triton"):
        return lambda x: sequence_logprobs(x["logits"], x["labels"], backend=name)
    if name == "head_naive":
        return lambda x: naive(x["hidden"] @ x["weight"].t(), x["labels"])
    if name in ("head_torch", "head_triton"):
        backend = name.split("_")[1]
        return lambda x: sequence_logprobs(x["hidden"] @ x["weight"].t(), x["labels"],
                                           backend=backend)
    backend = "torch" if name == "fused_head_torch" else "auto"
    return lambda x: sequence_logprobs_from_hidden(
        x["hidden"], x["weight"], x["labels"], chunk_tokens=args.chunk_tokens or None, backend=backend)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _drop_grads(inputs):
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            v.grad = None


def one_run(fwd, inputs, device):
    """-> (forward seconds, backward seconds) of one forward + backward."""
    _drop_grads(inputs)
    _sync(device)
    t0 = time.perf_counter()
    out = fwd(inputs)
    _sync(device)
    t1 = time.perf_counter()
    (out * inputs["upstream"]).sum().backward()
    _sync(device)
    t2 = time.perf_counter()
    _drop_grads(inputs)
    return t1 - t0, t2 - t1


def time_worker(names, args):
    """Time all providers in this process, interleaved: round r runs each provider once, so a
    change in the machine's load between rounds hits every provider alike. -> {name: dict}."""
    device = torch.device(args.device)
    _set_threads(args)
    inputs = {g: make_inputs(args, g, device) for g in {PROVIDERS[n] for n in names}}
    fwds, results = {}, {}
    for name in names:
        start = time.perf_counter()
        try:
            fwds[name] = make_forward(name, args)
            for _ in range(args.warmup):
                one_run(fwds[name], inputs[PROVIDERS[name]], device)
        except Exception as e:  # e.g. torch.compile without a working compiler: report, go on
            fwds.pop(name, None)
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"}
            continue
        results[name] = {"fwd": [], "bwd": [], "total": [],
                         "warmup_s": time.perf_counter() - start, "device": _device_name(device)}
    for _ in range(args.repeats):
        for name, fwd in fwds.items():
            f, b = one_run(fwd, inputs[PROVIDERS[name]], device)
            for key, value in (("fwd", f), ("bwd", b), ("total", f + b)):
                results[name][key].append(value)
    return results


def _proc_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def extra_peak(run, inputs, device):
    """Bytes one call of run() adds at its peak on top of what is allocated now (see docstring)."""
    _drop_grads(inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _proc_status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        run()
        peak = _proc_status("VmHWM:") - base
    _drop_grads(inputs)
    return peak


def memory_worker(name, args):
    """Extra peak memory of one provider, alone in this process (see the docstring)."""
    device = torch.device(args.device)
    _set_threads(args)
    inputs = make_inputs(args, PROVIDERS[name], device)
    fwd = make_forward(name, args)

    def fwd_bwd():
        (fwd(inputs) * inputs["upstream"]).sum().backward()

    def fwd_only():
        with torch.no_grad():
            fwd(inputs)

    fwd_bwd()  # warm up (compiles, first-call allocations)
    return {"peak_fwd_bwd": extra_peak(fwd_bwd, inputs, device),
            "peak_fwd": extra_peak(fwd_only, inputs, device)}


def _set_threads(args):
    """The same intra-op thread count for every provider (each worker process sets it first)."""
    if args.threads:
        torch.set_num_threads(args.threads)


def _load_average():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = "CPU"
    return f"{os.cpu_count()}-core {model}"


def _subprocess(args, worker, providers, env_extra=None):
    """Run this script as a worker in a fresh process; -> its result, or {'error': reason}."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               **(env_extra or {}))
    cmd = [sys.executable, __file__, "--worker", worker, "--providers", providers]
    proc = subprocess.run(cmd + _forward_flags(args), env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{worker}: {reason[:200]}"}
    return json.loads(lines[-1][len("RESULT "):])


def measure_all(names, args):
    """Times (one process, interleaved), then memory (a fresh process per provider, under
    MALLOC_MMAP_THRESHOLD_, see the docstring); -> list of dicts for the table."""
    print(f"timing {', '.join(names)} ...", file=sys.stderr, flush=True)
    times = _subprocess(args, "time", ",".join(names))
    results = []
    for name in names:
        r = {"name": name, "group": PROVIDERS[name]}
        r.update({"error": times["error"]} if "error" in times else times[name])
        if "error" not in r:
            print(f"memory of {name} ...", file=sys.stderr, flush=True)
            r.update(_subprocess(args, "memory", name, {"MALLOC_MMAP_THRESHOLD_": "65536"}))
        results.append(r)
    return results


def _forward_flags(args):
    flags = []
    for key in ("B", "T", "V", "H", "dtype", "device", "repeats", "warmup", "prompt_frac",
                "chunk_tokens", "threads"):
        flags += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return flags + (["--train-head"] if args.train_head else [])


def _ms(values):
    return f"{statistics.median(values) * 1e3:.1f} [{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}]"


def _bandwidth(r, args):
    """-> 'GB/s (share of peak)' for forward and forward+backward, logits group on CUDA only.

    Bytes are the least any implementation must move: the forward reads each scored row once;
    the backward reads the scored rows again and writes the whole gradient.
    """
    if r["group"] != "logits" or args.device != "cuda":
        return "-", "-"
    row = args.V * torch.finfo(DTYPES[args.dtype]).bits // 8
    scored = args.B * (args.T - int(args.T * args.prompt_frac))
    peak = next((v for k, v in PEAK_BANDWIDTH.items() if k in r["device"]), None)
    cells = []
    for moved, times in ((scored * row, r["fwd"]), ((2 * scored + args.B * args.T) * row, r["total"])):
        rate = moved / statistics.median(times)
        cells.append(f"{rate / 1e9:.0f} ({100 * rate / peak:.0f}%)" if peak else f"{rate / 1e9:.0f}")
    return cells


def print_table(results, args):
    """Markdown table: times, ratio to the group's first provider, extra peak memory, bandwidth."""
    threads = args.threads or torch.get_num_threads()
    print(f"\nB={args.B} T={args.T} V={args.V} H={args.H} {args.dtype}, prompt {args.prompt_frac:.0%} "
          f"ignored, {args.repeats} runs, {threads} threads for every provider; times in ms: median "
          f"[min-max]; memory: extra peak MiB; load average before the run: {args.load}\n")
    print("| device | provider | forward | backward | total | speed-up | peak fwd (no_grad) "
          "| peak fwd+bwd | memory ratio | GB/s fwd (roofline) | GB/s total (roofline) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base = {}
    for r in results:
        if "error" in r:
            print(f"| - | {r['name']} | failed: {r['error']} | | | | | | | | |")
            continue
        b = base.setdefault(r["group"], r)
        speed = statistics.median(b["total"]) / statistics.median(r["total"])
        mem = r["peak_fwd_bwd"] / max(b["peak_fwd_bwd"], 1)
        gbs_fwd, gbs_total = _bandwidth(r, args)
        print(f"| {r['device']} | {r['name']} | {_ms(r['fwd'])} | {_ms(r['bwd'])} | {_ms(r['total'])} "
              f"| {speed:.2f}x vs {b['name']} | {r['peak_fwd'] / 2**20:.0f} | "
              f"{r['peak_fwd_bwd'] / 2**20:.0f} | {mem:.3f}x | {gbs_fwd} | {gbs_total} |")


def _goal(text, ok):
    print(f"goal {text}: {'PASS' if ok else 'FAIL'}")


def check_goals(results, args):
    """Print the issue's goals as measured in this run (each needs its providers to have run).
    The H100 goals are stated for B=8 T=1024 V=32000 bf16 H=4096 with --prompt-frac 0."""
    by = {r["name"]: r for r in results if "error" not in r}
    med = lambda n: statistics.median(by[n]["total"])  # noqa: E731
    peak = lambda n: by[n]["peak_fwd_bwd"]  # noqa: E731
    print()
    if {"naive", "torch"} <= by.keys():
        speed, mem = med("naive") / med("torch"), peak("torch") / peak("naive")
        _goal(f"torch path {speed:.2f}x faster than naive (>= 2) at {mem:.3f}x its extra peak "
              f"(<= 0.45)", speed >= 2 and mem <= 0.45)
    if {"head_naive", "fused_head"} <= by.keys():
        mem = peak("fused_head") / peak("head_naive")
        _goal(f"fused head extra peak {mem:.3f}x of head_naive (<= 1/8)", mem <= 0.125)
    if args.device == "cuda" and "triton" in by:
        _gpu_goals(by, med, args)


def _gpu_goals(by, med, args):
    fwd, total = statistics.median(by["triton"]["fwd"]), med("triton")
    rate = [float(c.split()[0]) for c in _bandwidth(by["triton"], args)]
    peak = next((v for k, v in PEAK_BANDWIDTH.items() if k in by["triton"]["device"]), None)
    if peak:
        _goal(f"triton forward {fwd * 1e3:.3f} ms, {rate[0] * 1e9 / peak:.0%} of the memory "
              f"bandwidth (>= 75%)", rate[0] * 1e9 / peak >= 0.75)
        _goal(f"triton forward+backward {total * 1e3:.3f} ms, {rate[1] * 1e9 / peak:.0%} (>= 60%)",
              rate[1] * 1e9 / peak >= 0.60)
    for other, need in (("naive", 4.0), ("compile", 1.0)):
        if other in by:
            _goal(f"triton {med(other) / total:.2f}x faster than {other} (> {need:g})",
                  med(other) / total >= need)
    if {"head_triton", "fused_head"} <= by.keys():
        ratio, mem = med("fused_head") / med("head_triton"), by["fused_head"]["peak_fwd_bwd"] / 2**20
        _goal(f"fused head {ratio:.2f}x the unfused time (<= 1.15) with {mem:.0f} MiB extra "
              f"(<= 256)", ratio <= 1.15 and mem <= 256)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--H", type=int, default=256, help="hidden size for the head providers")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompt-frac", type=float, default=0.25)
    p.add_argument("--chunk-tokens", type=int, default=0,
                   help="fused-head chunk (0: minidpo's default for the device, 512 on CPU)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for every provider (0: torch's default)")
    p.add_argument("--train-head", action="store_true", help="the head weight also gets a gradient")
    p.add_argument("--providers", default=None, help="comma separated; default: all that apply")
    p.add_argument("--quick", action="store_true",
                   help="B=2 T=128 V=8000 H=64, chunk_tokens=64, 3 repeats")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--worker", choices=("time", "memory"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.B, args.T, args.V, args.H, args.repeats, args.chunk_tokens = 2, 128, 8000, 64, 3, 64
    return args


def main(argv=None):
    args = parse_args(argv)
    names = args.providers.split(",") if args.providers else [
        n for n in PROVIDERS if n not in CUDA_ONLY or args.device == "cuda"]
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise SystemExit(f"unknown providers {unknown}; choose from {list(PROVIDERS)}")
    if args.worker == "time":
        print("RESULT " + json.dumps(time_worker(names, args)))
        return
    if args.worker == "memory":
        print("RESULT " + json.dumps(memory_worker(names[0], args)))
        return
    args.load = _load_average()
    results = measure_all(names, args)
    print_table(results, args)
    check_goals(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
