"""Peak host memory and time of loading a Hugging Face Mistral folder: minidpo vs transformers.

Each provider runs in a fresh subprocess. Just before loading (after imports) it resets the
kernel's peak-RSS counter (`/proc/self/clear_refs`, Linux); its extra peak is `VmHWM` afterwards
minus the RSS at that moment. (`ru_maxrss` is no good here: it survives `exec` and so reports
the parent's peak.)
The goal (issue 2): minidpo's peak <= 1.3 x the model's size in the target dtype.

    python benchmarks/bench_load.py [--hidden 1024 --layers 8 --vocab 32000 --repeats 3]
    python benchmarks/bench_load.py --gguf .venv/wheels/files/SmolLM2-135M-Instruct.Q4_1.gguf --dtypes float32
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, psutil, torch
folder, provider, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
import minidpo, transformers
def hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) * 1024
# The first nn.Embedding of a process costs torch a one-time ~147 MiB (lazy init, whatever the
# size): pay it before the baseline so the column measures loading, for both providers alike.
torch.nn.Embedding(2, 2, device="meta")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
base = psutil.Process().memory_info().rss
t0 = time.perf_counter()
if provider == "minidpo":
    model = minidpo.load_model(folder, dtype=dtype)
elif folder.endswith(".gguf"):  # transformers' own GGUF loading (dequantizes with the gguf package)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder.rpartition("/")[0], gguf_file=folder,
                                                              dtype=dtype)
else:
    model = transformers.MistralForCausalLM.from_pretrained(folder, dtype=dtype)
seconds = time.perf_counter() - t0
# transformers maps the files lazily: touch every weight so both count what a forward would.
sum(float(p.detach().view(-1)[::512].sum()) for p in model.parameters())  # one read per page
peak = hwm()
size = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())
print(json.dumps({"seconds": seconds, "extra_peak": peak - base, "model_bytes": size}))
"""


def make_folder(folder: Path, args):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 7 // 2,
                           num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                           num_key_value_heads=max(1, args.hidden // 512))
    with torch.device("cpu"):
        model = MistralForCausalLM(config).to(getattr(torch, args.stored_dtype))
    model.save_pretrained(folder, max_shard_size="200MB")


def run(folder, provider, dtype):
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), provider, dtype],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--stored-dtype", default="float32")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gguf", help="time loading this .gguf file instead of a generated folder")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.gguf:
            tmp = str(Path(args.gguf).resolve())
        else:
            make_folder(Path(tmp), args)
        print(f"| provider | target dtype | model MiB | load s (median, min-max) | extra peak RSS MiB | peak / model size |")
        print("|---|---|---|---|---|---|")
        for dtype in args.dtypes.split(","):
            for provider in ("minidpo", "transformers"):
                rows = [run(tmp, provider, dtype) for _ in range(args.repeats)]
                secs = [r["seconds"] for r in rows]
                peak = statistics.median(r["extra_peak"] for r in rows)
                size = rows[0]["model_bytes"]
                print(f"| {provider} | {dtype} | {size / 2**20:.0f} | {statistics.median(secs):.2f} "
                      f"({min(secs):.2f}-{max(secs):.2f}) | {peak / 2**20:.0f} | {peak / size:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
