"""One LoRA DPO training step with and without prefix sharing, on two length profiles, in one run.

    python benchmarks/bench_prefix_sharing.py                 # ~8 min on a busy 2-core machine
    python benchmarks/bench_prefix_sharing.py --steps 2 --profiles capybara --vocab 4096   # quicker

The model: a random Mistral (hidden 256, intermediate 768, 4 layers, 8 heads, 2 KV heads,
vocabulary 32000 or `--vocab`, no sliding window, fp32), LoRA r=16, alpha=32, dropout 0.05 on
q,k,v,o,gate,up,down; the reference is the same model with its adapters off; sigmoid loss; batch 4 pairs; AdamW.
The pairs: random token ids, lengths drawn uniformly within +-25% of each profile's means:
    capybara      prompt 320, replies 200 each (prompt:answer 1.6, Capybara's multi-turn ratio)
    ultrafeedback prompt 120, replies 300 each (prompt:answer 0.4)
A step is `minidpo.train.dpo_step` (reference pass, policy forward and backward) plus
`optimizer_step`, exactly as `train()` runs them, batches built by `make_batch` inside the timing.

Method. Timing: per profile one subprocess alternates the two layouts step by step (the machine may
be shared: both meet the same load), `--warmup` steps each untimed, then `--steps` timed steps each;
the speedup is the median ratio of adjacent (unshared, shared) steps. tokens/s counts the tokens of the
2B unshared rows (the prompt twice) for both layouts, so it measures the same work per second.
Peak memory: one fresh subprocess per (profile, layout), warmup + 1 step: the kernel's peak RSS
(VmHWM) after resetting it (`/proc/self/clear_refs`) once the model is built, minus the RSS at that
moment: what the steps added.
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
BATCH = 4

CHILD = r"""
import importlib, json, random, statistics, sys, time
import torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
T = importlib.import_module("minidpo.train")
from minidpo.data import TokenizedPair
from minidpo.lora import apply_lora
from minidpo.model import Mistral, MistralConfig

def rss(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1]) * 1024

torch.manual_seed(0)
model = Mistral(MistralConfig(vocab_size=spec["vocab"], hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                              num_attention_heads=8, num_key_value_heads=2, sliding_window=None)).init_weights(seed=0)
apply_lora(model, r=16, alpha=32.0, dropout=0.05)
model.train()
rng = random.Random(1)
prompt, reply = spec["lengths"]
vary = lambda n: rng.randint(int(0.75 * n), int(1.25 * n))
ids = lambda n: [rng.randrange(3, spec["vocab"]) for _ in range(n)]
layouts = spec["layouts"]  # run in turn, step by step, so both meet the same machine load
n_steps = (spec["warmup"] + spec["steps"]) * len(layouts)
pairs = [TokenizedPair(ids(vary(prompt)), ids(vary(reply)), ids(vary(reply)), "bench", i)
         for i in range(BATCH * n_steps)]
config = T.TrainConfig(model="m", data=["d"], out="o", batch_size=BATCH, lora_r=16, lora_alpha=32.0, lr=5e-5)
optimizer, scheduler = T.build_optimizer(model, config, n_steps)
params = [p for g in optimizer.param_groups for p in g["params"]]
open("/proc/self/clear_refs", "w").write("5")
base = rss("VmRSS")
times = {str(x): [] for x in layouts}
for s in range(n_steps):
    shared = layouts[s % len(layouts)]
    start = time.perf_counter()
    batch = T.make_batch(pairs, list(range(s * BATCH, (s + 1) * BATCH)), 0, torch.device("cpu"),
                         packed=shared)
    metrics = T.dpo_step(model, [batch], config, None)
    T.optimizer_step(params, optimizer, scheduler, metrics, config, s + 1)
    times[str(shared)].append((time.perf_counter() - start, batch["tokens"]))
print("RESULT " + json.dumps({"times": {k: v[spec["warmup"]:] for k, v in times.items()},
      "extra_peak": rss("VmHWM") - base}), flush=True)
""".replace("BATCH", str(BATCH))


def run_child(profile: str, layouts: list, args, steps: int) -> dict:
    spec = {"lengths": PROFILES[profile], "layouts": layouts, "threads": args.threads, "vocab": args.vocab,
            "warmup": args.warmup, "steps": steps}
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                          env=env, check=False)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{profile} {layouts} failed:\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per layout first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size of the random model")
    parser.add_argument("--profiles", nargs="+", choices=list(PROFILES), default=list(PROFILES))
    args = parser.parse_args(argv)
    print(f"device: CPU, {os.cpu_count()} cores, {args.threads} torch threads; {args.steps} timed steps "
          f"per layout, alternating; vocabulary {args.vocab}")
    print("| profile | layout | step s (median) | spread | tokens/s | extra peak RSS MiB | speedup (median of paired steps) |")
    print("|---|---|---|---|---|---|---|")
    for profile in args.profiles:
        timed = run_child(profile, [False, True], args, args.steps)["times"]
        peaks = {shared: run_child(profile, [shared], args, 1)["extra_peak"] for shared in (False, True)}
        ratios = [a[0] / b[0] for a, b in zip(timed["False"], timed["True"])]
        for shared in (False, True):
            steps = [t for t, _ in timed[str(shared)]]
            tps = statistics.median(n / t for t, n in timed[str(shared)])
            speed = f"{statistics.median(ratios):.2f}x" if shared else "1.00x"
            print(f"| {profile} | {'shared' if shared else 'unshared'} | {statistics.median(steps):.3f} | "
                  f"{min(steps):.3f}-{max(steps):.3f} | {tps:.0f} | {peaks[shared] / 2**20:.0f} | {speed} |")


if __name__ == "__main__":
    main()
