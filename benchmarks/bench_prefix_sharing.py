"""One LoRA DPO training step with and without prefix sharing, on two length profiles, in one run.

    python benchmarks/bench_prefix_sharing.py                          # both shapes, ~8 min on 2 cores
    python benchmarks/bench_prefix_sharing.py --shapes 7b-ratio --steps 2 --profiles capybara  # quicker

The models: random Mistrals, fp32, no sliding window, in one of two shapes (`--shapes`):
    7b-ratio   hidden 768, intermediate 2688, 2 layers, 12 heads, 3 KV heads, vocabulary 1024
    small-32k  hidden 256, intermediate 768, 4 layers, 8 heads, 2 KV heads, vocabulary 32000
Why two. Prefix sharing saves the prompt's second pass through the body (embeddings, decoder
layers), not the head: both layouts score the same reply tokens, and the fused head sees only those.
So the gain depends on the share of the step's FLOPs that the head takes. In Mistral-7B (hidden
4096, 32 layers, intermediate 14336, vocabulary 32000) the head is about 2% of a token's FLOPs
and under 1% of a step's on these profiles; in `small-32k` it is about 60% of a token's and close
to half the step's, which caps any body saving near 1.2x whatever the layout does. `7b-ratio`
keeps the head's share of the step near Mistral-7B's (printed as `head %`, with Mistral-7B's on the
same batches) at a size two CPU cores can step in seconds. Its attention share is still larger
than at 7B. `--vocab` overrides either shape's vocabulary. `--attention` picks the packed rows'
attention (`sdpa`: `minidpo.prefix.PackedAttention`, the default; `flex`: FlexAttention, CUDA only)
and `--device cuda` runs on a GPU (peak memory: max_memory_allocated over the steps instead of RSS).
LoRA r=16, alpha=32, dropout 0.05 on q,k,v,o,gate,up,down; the reference is the same model with its
adapters off; sigmoid loss; batch 4 pairs; AdamW.
The pairs: random token ids, lengths drawn uniformly within +-25% of each profile's means:
    capybara      prompt 320, replies 200 each (prompt:answer 1.6, Capybara's multi-turn ratio)
    ultrafeedback prompt 120, replies 300 each (prompt:answer 0.4)
A step is `minidpo.train.dpo_step` (reference pass, policy forward and backward) plus
`optimizer_step`, exactly as `train()` runs them, batches built by `make_batch` inside the timing.

Method. Timing: per (shape, profile) one subprocess cuts `--warmup + --steps` batches as train()
does (grouped by length unless `--no-group-by-length`) and steps each batch in both layouts back to
back, in alternating order (the machine may be shared: both meet the same load); the warmup batches
are untimed. The speedup is the median over batches of unshared / shared step time: the same pairs.
On a busy machine `--threads 1 --clock cpu` times the process's own CPU seconds, which other
processes do not inflate. tokens/s counts the tokens of the 2B unshared rows (the prompt twice) for
both layouts, so it measures the same work per second. `pad %`: padding share of the rows' slots.
`FLOP ratio`: forward multiply-adds of the unshared batches over the shared ones (linear layers per
slot, dense attention per slot and width, head per scored token), the speed-up a FLOP-bound step
would get (conservative: the shared layout's two-piece attention skips most of the dense width). Peak memory: one fresh subprocess per (shape, profile, layout), warmup + 1 step: the
kernel's peak RSS (VmHWM) after resetting it (`/proc/self/clear_refs`) once the model is built,
minus the RSS at that moment: what the steps added.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILES = {"capybara": (320, 200), "ultrafeedback": (120, 300)}  # mean prompt, mean reply tokens
SHAPES = {  # MistralConfig keys
    "7b-ratio": dict(vocab_size=1024, hidden_size=768, intermediate_size=2688, num_hidden_layers=2,
                     num_attention_heads=12, num_key_value_heads=3),
    "small-32k": dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2),
}
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8)
BATCH = 4

CHILD = r"""
import importlib, json, random, statistics, sys, time
import torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
T = importlib.import_module("minidpo.train")
from minidpo.data import TokenizedPair, batches
from minidpo.lora import apply_lora
from minidpo.model import Mistral, MistralConfig

def rss(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1]) * 1024

device = torch.device(spec["device"])
cuda = device.type == "cuda"
torch.manual_seed(0)
model = Mistral(MistralConfig(sliding_window=None, **spec["shape"])).init_weights(seed=0).to(device)
vocab = spec["shape"]["vocab_size"]
apply_lora(model, r=16, alpha=32.0, dropout=0.05)
model.train()
rng = random.Random(1)
prompt, reply = spec["lengths"]
vary = lambda n: rng.randint(int(0.75 * n), int(1.25 * n))
ids = lambda n: [rng.randrange(3, vocab) for _ in range(n)]
layouts = spec["layouts"]
n_batches = spec["warmup"] + spec["steps"]
pairs = [TokenizedPair(ids(vary(prompt)), ids(vary(reply)), ids(vary(reply)), "bench", i)
         for i in range(BATCH * n_batches)]
# Batches as train() cuts them (grouped by length by default), the same ones for both layouts.
order = batches(pairs, BATCH, seed=0, group_by_length=spec["group_by_length"])
config = T.TrainConfig(model="m", data=["d"], out="o", batch_size=BATCH, lora_r=16, lora_alpha=32.0, lr=5e-5)
optimizer, scheduler = T.build_optimizer(model, config, n_batches * len(layouts))
params = [p for g in optimizer.param_groups for p in g["params"]]
open("/proc/self/clear_refs", "w").write("5")
base = rss("VmRSS")
if cuda:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
times = {str(x): [] for x in layouts}
clock = {"wall": time.perf_counter, "cpu": time.process_time}[spec["clock"]]
step = 0
for s, indices in enumerate(order):
    # Each batch in both layouts, back to back (both meet the same machine load), first one
    # layout then the other, so neither always runs on the caches the other warmed.
    for shared in (layouts if s % 2 == 0 else layouts[::-1]):
        step += 1
        start = clock()
        batch = T.make_batch(pairs, indices, 0, device, packed=shared, attention=spec["attention"])
        metrics = T.dpo_step(model, [batch], config, None)
        T.optimizer_step(params, optimizer, scheduler, metrics, config, step)
        if cuda:
            torch.cuda.synchronize()
        seconds = clock() - start
        rows, width = batch["input_ids"].shape
        real = int((batch["segments"] >= 0).sum()) if shared else int(batch["attention_mask"].sum())
        times[str(shared)].append((seconds, batch["tokens"], rows, width, batch["scored"], real))
from torch._dynamo.utils import counters
print("RESULT " + json.dumps({"times": {k: v[spec["warmup"]:] for k, v in times.items()},
      "extra_peak": (torch.cuda.max_memory_allocated() if cuda else rss("VmHWM")) - base,
      "graphs": counters["stats"]["unique_graphs"]}), flush=True)
""".replace("BATCH", str(BATCH))


def forward_macs(shape: dict, rows: int, width: int, scored: int) -> dict:
    """Multiply-adds of one forward over a [rows, width] batch: `body` (linear layers, every slot),
    `attention` (dense: each slot against the row's whole width, as a 4-D mask makes it) and
    `head` (scored tokens only, as the fused head does)."""
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    slots = rows * width
    return {"body": n * slots * (2 * h * q + 2 * h * kv + 3 * h * i), "attention": n * slots * 2 * width * q,
            "head": scored * shape["vocab_size"] * h}


def flop_summary(shape: dict, timed: dict) -> dict:
    """head % and attention % of the unshared batches' forward MACs, and unshared / shared MACs."""
    total = {}
    for layout in ("False", "True"):
        parts = [forward_macs(shape, rows, width, scored) for _, _, rows, width, scored, _ in timed[layout]]
        total[layout] = {k: sum(p[k] for p in parts) for k in parts[0]}
    plain = total["False"]
    whole = sum(plain.values())
    return {"head": plain["head"] / whole, "attention": plain["attention"] / whole,
            "ratio": whole / sum(total["True"].values())}


def pad_share(timed: list) -> float:
    """Padding share of the slots (rows x width) of a layout's timed batches."""
    return 1 - sum(row[5] for row in timed) / sum(row[2] * row[3] for row in timed)


def run_child(shape: dict, profile: str, layouts: list, args, steps: int) -> dict:
    spec = {"lengths": PROFILES[profile], "layouts": layouts, "threads": args.threads, "shape": shape,
            "clock": args.clock, "group_by_length": args.group_by_length,
            "device": args.device, "attention": args.attention,
            "warmup": args.warmup, "steps": steps}
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                          env=env, check=False)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{profile} {layouts} failed:\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def report(name: str, shape: dict, profile: str, args) -> None:
    """Time both layouts alternating, measure each one's peak, print two table rows."""
    result = run_child(shape, profile, [False, True], args, args.steps)
    timed = result["times"]
    peaks = {shared: run_child(shape, profile, [shared], args, 1)["extra_peak"] for shared in (False, True)}
    ratios = [a[0] / b[0] for a, b in zip(timed["False"], timed["True"])]
    flops, at_7b = flop_summary(shape, timed), flop_summary(MISTRAL_7B, timed)
    for shared in (False, True):
        rows = timed[str(shared)]
        steps = [row[0] for row in rows]
        tps = statistics.median(row[1] / row[0] for row in rows)
        speed = f"{statistics.median(ratios):.2f}x" if shared else "1.00x"
        ideal = f"{flops['ratio']:.2f}x ({at_7b['ratio']:.2f}x)" if shared else "1.00x"
        shares = (f"{100 * flops['head']:.0f} ({100 * at_7b['head']:.1f}) | "
                  f"{100 * flops['attention']:.0f} ({100 * at_7b['attention']:.1f})")
        print(f"| {name} | {profile} | {'shared' if shared else 'unshared'} | {statistics.median(steps):.3f} | "
              f"{min(steps):.3f}-{max(steps):.3f} | {tps:.0f} | {peaks[shared] / 2**20:.0f} | "
              f"{100 * pad_share(rows):.0f} | {shares} | {ideal} | {speed} | {result['graphs']} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per layout first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="step time: wall clock, or the process's CPU time (with --threads 1 it "
                             "does not count the time other processes take from a shared machine)")
    parser.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                        help="cut batches as train() does by default (similar lengths together)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the shape's)")
    parser.add_argument("--profiles", nargs="+", choices=list(PROFILES), default=list(PROFILES))
    parser.add_argument("--attention", choices=("sdpa", "flex"), default="sdpa",
                        help="the packed rows' attention (flex: FlexAttention, CUDA only)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    print(f"device: {args.device}, {os.cpu_count()} cores, {args.threads} torch threads, {args.attention} "
          f"attention for packed rows; {args.steps} timed steps "
          f"per layout, alternating; {args.clock} clock; "
          f"batches {'grouped by length' if args.group_by_length else 'random'}")
    print("head %, attention %: shares of the unshared step's forward multiply-adds, Mistral-7B's on the "
          "same batches in brackets; FLOP ratio: unshared / shared (Mistral-7B's in brackets)")
    print("graphs: torch.compile graphs made in the timing run (FlexAttention: the attention and its block "
          "mask once, whatever the widths; sdpa: 0)")
    print("| shape | profile | layout | step s (median) | spread | tokens/s | extra peak RSS MiB | pad % | "
          "head % | attention % | FLOP ratio | speedup (median of paired steps) | graphs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.shapes:
        shape = {**SHAPES[name], **({"vocab_size": args.vocab} if args.vocab else {})}
        for profile in args.profiles:
            report(name, shape, profile, args)


if __name__ == "__main__":
    main()
