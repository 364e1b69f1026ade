"""What `--report-to` costs a run: importing the tool, opening its run, logging records, closing.

Each row runs in a fresh process (so the import is counted; torch and minidpo are imported before
the clock starts): median and spread (min..max) over `--repeats` processes. The records are
metrics.jsonl-shaped (16 numbers); W&B runs offline, trackio into a temporary store.

    python benchmarks/bench_tracking.py [--records 1000 --repeats 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ONE = r"""
import json, sys, tempfile, time
from pathlib import Path
import torch
from minidpo.train import TrainConfig
tool, n = sys.argv[1], int(sys.argv[2])
out = Path(tempfile.mkdtemp())
keys = ["epoch", "examples", "tokens", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy",
        "rewards/margin", "logps/chosen", "logps/rejected", "lr", "grad_norm", "step_time_s", "a", "b", "c"]
t0 = time.perf_counter()
from minidpo import tracking
config = TrainConfig(model="m", data=["d"], out=str(out), report_to=[tool])  # imports the tool
t1 = time.perf_counter()
trackers = tracking.open_trackers(config, out, 0)
t2 = time.perf_counter()
for step in range(1, n + 1):
    trackers.log({"step": step, **{k: 1.0 / (step + i) for i, k in enumerate(keys)}})
t3 = time.perf_counter()
trackers.close()
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "open": t2 - t1, "log": (t3 - t2) / n, "close": t4 - t3}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false",
           "TRACKIO_DIR": str(root / "trackio"), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    print(f"{'tool':<12} {'import s':>16} {'open s':>16} {'per record ms':>18} {'close s':>16}")
    for tool in ("tensorboard", "wandb", "trackio"):
        runs = []
        for _ in range(args.repeats):
            done = subprocess.run([sys.executable, "-c", ONE, tool, str(args.records)], env=env,
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"{tool:<12} not measured: {done.stderr.strip().splitlines()[-1]}")
                break
            runs.append(json.loads(next(l for l in reversed(done.stdout.splitlines()) if l.startswith("{"))))
        if len(runs) == args.repeats:
            cells = []
            for key, scale in (("import", 1), ("open", 1), ("log", 1000), ("close", 1)):
                values = [r[key] * scale for r in runs]
                cells.append(f"{statistics.median(values):.3f} ({min(values):.3f}..{max(values):.3f})")
            print(f"{tool:<12} {cells[0]:>16} {cells[1]:>16} {cells[2]:>18} {cells[3]:>16}")


if __name__ == "__main__":
    main()
