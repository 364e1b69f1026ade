"""QLoRA: a LoRA DPO step on a 4-bit NF4 base against the same step on a bf16 (and fp32) base.

    python benchmarks/bench_qlora.py                  # Mistral-shaped, hidden 1024, 8 layers: a few minutes on 2 cores
    python benchmarks/bench_qlora.py --hidden 512 --layers 4 --steps 3   # a quick look
    python benchmarks/bench_qlora.py --device cuda --shape-7b --bases bf16,nf4-bf16 --pairs 4 --seq 512  # a GPU

The model: a random Mistral saved by transformers as a bf16 folder (hidden H, intermediate 3.5 H,
H / 128 heads, H / 512 KV heads, vocabulary 32000, shards of 200 MB). Each base runs in a fresh
subprocess: `load_model(dtype=..., quantize=None or "nf4")` (NF4 with double quantization), LoRA
r=16 alpha=32 on q,k,v,o,gate,up,down (fp32 adapters), `--pairs` pairs of `--seq` tokens per row
(chosen and rejected: 2 x pairs rows), the DPO step of the training loop (reference = adapters off,
sigmoid loss, beta 0.1, one fused AdamW step on the adapters).

Columns. Frozen-base bytes: the model's parameters and buffers before LoRA (NF4 codes, absmax,
statistics; embeddings, norms and the head in the compute dtype), also for the Linear weights alone;
at 7B shape (Mistral-7B's config) they are computed on the meta device (exact sizes, no memory).
Load peak (CPU): VmHWM after loading minus the RSS just before it (the kernel's peak counter is reset
with `/proc/self/clear_refs`, as bench_load.py does), over the loaded model's bytes: the loader's
bound is 1.3x. Step: median over `--steps` steps after one untimed warmup (wall clock, or with
`--clock cpu` the process's CPU time); step peak: VmHWM during the steps minus the RSS after loading
(reset again), i.e. activations, temporaries and optimizer.
On CUDA both peaks are `torch.cuda.max_memory_allocated()` over the allocation before (and the
intermediate 3.5 H is 14336 at 7B: Mistral's own).
The goals of issue 19: frozen base <= 0.30x of bf16 (at 7B shape), CPU step time <= 1.5x of bf16.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASES = {"bf16": ("bfloat16", None), "nf4-bf16": ("bfloat16", "nf4"),
         "fp32": ("float32", None), "nf4-fp32": ("float32", "nf4")}

CHILD = r"""
import importlib, json, statistics, sys, time
import torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
import minidpo
from minidpo.lora import apply_lora, lora_parameters
T = importlib.import_module("minidpo.train")
def rss(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1]) * 1024
def reset():
    open("/proc/self/clear_refs", "w").write("5")
    return rss("VmRSS")
torch.nn.Embedding(2, 2, device="meta")  # torch's one-time lazy init, before the baseline
dtype, device = getattr(torch, spec["dtype"]), torch.device(spec["device"])
cuda = device.type == "cuda"
def peak(since):
    return torch.cuda.max_memory_allocated() - since if cuda else rss("VmHWM") - since
def start():
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return reset()
base = start()
if spec["folder"]:
    model = minidpo.load_model(spec["folder"], dtype=dtype, device=device, quantize=spec["quantize"])
else:  # random weights built on the device (at 7B: no 14 GB folder to write and read first)
    from minidpo.quant import install, quantizable, quantize_nf4
    with torch.device(device):
        model = minidpo.Mistral(minidpo.MistralConfig(**spec["config"])).to(dtype)
    for name in quantizable(model) if spec["quantize"] else []:
        install(model, name, quantize_nf4(model.get_parameter(name).detach(), double_quant=True))
load_peak = peak(base) if spec["folder"] else None  # in memory: the build's own transients, not a load
sizes = {"all": 0, "linear": 0}
for name, t in list(model.named_parameters()) + list(model.named_buffers()):
    sizes["all"] += t.numel() * t.element_size()
    sizes["linear"] += t.numel() * t.element_size() if "_proj." in name else 0
apply_lora(model, r=16, alpha=32, dropout=0.05)
model.train()
config = T.TrainConfig(model=spec["folder"] or "random", data=["unused"], out="unused", beta=0.1, prefix_sharing=False)
g = torch.Generator().manual_seed(0)
rows, seq = 2 * spec["pairs"], spec["seq"]
ids = torch.randint(3, 32000, (rows, seq), generator=g)
labels = ids.clone()
labels[:, : seq // 2] = -100  # the prompt half is not scored
batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device),
         "tokens": rows * seq, "scored": rows * (seq - seq // 2)}
optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-4, fused=True)
times = []
step_base = start()
clock = time.process_time if spec["clock"] == "cpu" else time.perf_counter
for i in range(spec["steps"] + 1):
    t0 = clock()
    T.dpo_step(model, [batch], config)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    times.append(clock() - t0)
print("RESULT " + json.dumps({"load_peak": load_peak, "bytes": sizes["all"], "linear_bytes": sizes["linear"],
      "step_s": statistics.median(times[1:]), "steps": times[1:], "step_peak": peak(step_base)}), flush=True)
"""


def make_folder(folder: Path, args):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(**model_config(args))
    MistralForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size="200MB")


def model_config(args) -> dict:
    """Mistral-shaped: intermediate 3.5 H, H / 128 heads, H / 512 KV heads (at H = 4096: Mistral-7B)."""
    return dict(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 7 // 2,
                num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                num_key_value_heads=max(1, args.hidden // 512), sliding_window=None)


def seven_b_bytes() -> dict:
    """Frozen-base bytes of Mistral-7B in bf16 and in NF4 (double quantization), on the meta device."""
    import torch

    sys.path.insert(0, str(ROOT))
    from minidpo.model import Mistral, MistralConfig
    from minidpo.quant import quantize_nf4, quantizable

    with torch.device("meta"):
        model = Mistral(MistralConfig()).to(torch.bfloat16)
    linear = set(quantizable(model))
    out = {"bf16": 0, "nf4": 0, "bf16 linear": 0, "nf4 linear": 0}
    by_shape = {}  # 4 shapes: quantize one of each
    for name, p in model.named_parameters():
        dense = p.numel() * 2
        out["bf16"] += dense
        if name in linear:
            if p.shape not in by_shape:
                by_shape[p.shape] = quantize_nf4(p, double_quant=True).nbytes()
            packed = by_shape[p.shape]
            out["nf4"] += packed
            out["bf16 linear"] += dense
            out["nf4 linear"] += packed
        else:
            out["nf4"] += dense
    return out


def run(folder, base, args):
    dtype, quantize = BASES[base]
    spec = {"folder": "" if args.in_memory else str(folder), "config": model_config(args), "dtype": dtype, "quantize": quantize, "pairs": args.pairs,
            "seq": args.seq, "steps": args.steps, "threads": args.threads, "device": args.device, "clock": args.clock}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{base} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--pairs", type=int, default=2, help="pairs per step (2 x pairs rows)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row")
    p.add_argument("--steps", type=int, default=3, help="timed steps per base (after one warmup)")
    p.add_argument("--rounds", type=int, default=1, help="subprocesses per base, interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch threads per subprocess")
    p.add_argument("--bases", default=",".join(BASES))
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="step time: wall clock, or the "
                   "process's CPU time (steadier on a machine shared with other work; with --threads 1)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (peaks from torch.cuda.max_memory_allocated)")
    p.add_argument("--in-memory", action="store_true", help="random weights built on the device, no folder "
                   "(no load peak then)")
    p.add_argument("--shape-7b", action="store_true", help="Mistral-7B's shape (hidden 4096, 32 layers), in "
                   "memory: for a GPU (the bf16 base alone is 14.5 GB)")
    args = p.parse_args()
    args.in_memory = args.in_memory or args.shape_7b
    bases = args.bases.split(",")
    mib = 2 ** 20
    big = seven_b_bytes()
    print(f"Mistral-7B shape, frozen base: bf16 {big['bf16'] / 2**30:.2f} GiB, NF4 {big['nf4'] / 2**30:.2f} GiB "
          f"= {big['nf4'] / big['bf16']:.3f}x (Linear weights alone {big['nf4 linear'] / big['bf16 linear']:.3f}x, "
          f"{8 * big['nf4 linear'] / (big['bf16 linear'] / 2):.3f} bits per weight)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape_7b:
            args.hidden, args.layers = 4096, 32
        if not args.in_memory:
            make_folder(Path(tmp), args)
        import torch

        print(f"model: Mistral hidden {args.hidden}, intermediate {args.hidden * 7 // 2}, {args.layers} layers, "
              f"vocab 32000; {args.pairs} pairs x 2 rows x {args.seq} tokens per step; {args.steps} timed steps; "
              f"{args.rounds} rounds; {args.threads} thread(s), {args.clock} clock; torch {torch.__version__}, {os.cpu_count()} CPUs; "
              f"{args.device}{' ' + torch.cuda.get_device_name() if args.device == 'cuda' else ''}",
              flush=True)
        results = {}
        for r in range(args.rounds):
            for base in bases:
                row = run(tmp, base, args)
                results.setdefault(base, []).append(row)
                print(f"round {r + 1} {base:9s} step {row['step_s']:.3f} s ({', '.join(f'{s:.3f}' for s in row['steps'])}), "
                      f"load peak {(row['load_peak'] or 0) / mib:.0f} MiB, step peak {row['step_peak'] / mib:.0f} MiB", flush=True)
    med = {b: {k: statistics.median(r[k] or 0 for r in rows) for k in ("bytes", "linear_bytes", "load_peak", "step_s",
                                                                       "step_peak")} for b, rows in results.items()}
    print()
    print("| base | frozen base MiB | vs bf16 | Linear weights MiB | vs bf16 | load peak / model | "
          "step s (median) | vs same-dtype base | step peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for base, m in med.items():
        ref = med.get("bf16" if "bf16" in base else "fp32") or m
        ref16 = med.get("bf16") or m
        load = f"{m['load_peak'] / m['bytes']:.2f}x" if m["load_peak"] else "-"
        print(f"| {base} | {m['bytes'] / mib:.0f} | {m['bytes'] / ref16['bytes']:.3f}x | {m['linear_bytes'] / mib:.0f} | "
              f"{m['linear_bytes'] / ref16['linear_bytes']:.3f}x | {load} | {m['step_s']:.3f} | "
              f"{m['step_s'] / ref['step_s']:.2f}x | {m['step_peak'] / mib:.0f} |")


if __name__ == "__main__":
    main()
