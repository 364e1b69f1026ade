"""One DPO training step: minidpo against TRL's DPOTrainer (+ PEFT), same model, same pairs, same batch.

    python benchmarks/bench_train_step.py                       # the issue's setting, ~5-10 min on 2 cores
    python benchmarks/bench_train_step.py --scenarios lora --steps 6 --rounds 1   # a quick look

The model: a random Mistral saved as a Hugging Face folder (hidden 256, intermediate 768, 4 layers,
8 heads, 2 KV heads, vocabulary 32000, fp32) with a byte-level BPE tokenizer trained here on the
benchmark's own text (its ids are < 32000; ChatML template). The pairs: `--pairs` synthetic
prompt/answer pairs of about 64 tokens each (prompt, chosen and rejected), the same rows for both
libraries; both render them with the same ChatML template. Batch 4 pairs, no accumulation, AdamW
lr 5e-5 with cosine decay, beta 0.1, sigmoid loss, fp32 weights on the CPU, max length 256 (nothing
is cut).

Scenarios (`--scenarios`):
    lora      LoRA r=16, alpha=32, dropout 0.05 on q,k,v,o,gate,up,down; the reference is the same
              model with its adapters off (minidpo `adapter-off`; TRL `ref_model=None` + peft_config)
    full      full fine-tune; the reference is a separate frozen model (minidpo `copy`; TRL an
              explicit `ref_model` loaded from the folder)
    lora-pre  as lora, reference log-probs computed once before training (minidpo `precomputed`
              with an empty cache; TRL `precompute_ref_log_probs=True`)
    full-pre  as full, likewise precomputed (neither side keeps a reference model)
    lora-simpo  as lora with the reference-free SimPO loss (beta 0.1, gamma 0.5, no NLL term): minidpo
              `--loss simpo`; TRL's `CPOTrainer(loss_type="simpo", cpo_alpha=0)`. No reference pass
TRL runs with gradient checkpointing off (its faster setting here), `disable_dropout=False` so the
LoRA dropout is the same on both sides, `logging_steps=1` (minidpo logs every step).
minidpo runs with `group_by_length=False` (TRL has no such default).

Method. Each (provider, scenario) runs in a fresh subprocess, `--rounds` times, interleaved; the
table gives the median over rounds. In the subprocess, after the imports that provider needs (and
torch's one-time lazy init of the first nn.Embedding, paid by both), the kernel's peak-RSS counter is
reset (`echo 5 > /proc/self/clear_refs`) and the RSS at that moment is the baseline; then the model
is loaded, the trainer built and `--steps` optimizer steps run. Step time: the interval between
consecutive optimizer-step ends (so data, forward, backward, optimizer and logging all count),
median over the steps after `--warmup`. Peak RSS: VmHWM at the end (absolute: what the process
needed, imports included), and VmHWM minus the baseline ("extra": what training added).
(`ru_maxrss` is no good here: it survives `exec`, so it would report the parent's peak.)
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("lora", "full", "lora-pre", "full-pre", "lora-simpo")
PROVIDERS = ("minidpo", "trl")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>"]

# Shared by both children: reset the peak, measure, report one JSON line.
PRELUDE = r"""
import json, os, statistics, sys, time
spec = json.loads(sys.argv[1])
import torch
def rss(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field))
    return int(line.split()[1]) * 1024
def report(ends, extra):
    gaps = [b - a for a, b in zip(ends, ends[1:])][spec["warmup"]:]
    print("RESULT " + json.dumps({"step_s": statistics.median(gaps), "steps_timed": len(gaps),
          "gaps": gaps, "peak": rss("VmHWM"), "base": BASE, **extra}), flush=True)
if spec["threads"]:
    torch.set_num_threads(spec["threads"])
torch.nn.Embedding(2, 2, device="meta")  # torch's one-time lazy init, before the baseline
"""

MINIDPO_CHILD = PRELUDE + r"""
import importlib
T = importlib.import_module("minidpo.train")  # the module (the package may export a function `train`)
open("/proc/self/clear_refs", "w").write("5")
BASE = rss("VmRSS")
ends, real = [], T.append_metrics
def timed(path, record):
    real(path, record)
    if "loss" in record:
        ends.append(time.perf_counter())
T.append_metrics = timed
full, pre = spec["scenario"].startswith("full"), spec["scenario"].endswith("-pre")
loss = "simpo" if spec["scenario"] == "lora-simpo" else "sigmoid"
config = T.TrainConfig(model=spec["folder"], data=[spec["pairs"]], out=spec["out"], full=full,
    reference="precomputed" if pre else "auto", ref_cache_dir=spec["cache"], lora_r=16, lora_alpha=32,
    lora_dropout=0.05, lr=5e-5, schedule="cosine", warmup_ratio=0.1, batch_size=4, max_steps=spec["steps"],
    max_length=256, max_prompt_length=128, group_by_length=False, beta=0.1, loss=loss, seed=0,
    device="cpu", dtype="float32", log_every=1000)
T.train(config)
tokens = [json.loads(l)["tokens"] for l in open(os.path.join(spec["out"], "metrics.jsonl"))]
report(ends, {"tokens_per_step": tokens[-1] / len(tokens)})
"""

TRL_CHILD = PRELUDE + r"""
import datasets, peft, transformers, trl
from transformers import MistralForCausalLM, PreTrainedTokenizerFast, TrainerCallback
open("/proc/self/clear_refs", "w").write("5")
BASE = rss("VmRSS")
full, pre = spec["scenario"].startswith("full"), spec["scenario"].endswith("-pre")
folder = spec["folder"]
tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"), bos_token="<s>",
    eos_token="<|im_end|>", unk_token="<unk>", pad_token="</s>")
tokenizer.chat_template = spec["template"]
model = MistralForCausalLM.from_pretrained(folder, dtype=torch.float32)
ref_model = MistralForCausalLM.from_pretrained(folder, dtype=torch.float32) if full else None
lora = None if full else peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=spec["targets"],
                                         task_type="CAUSAL_LM")
rows = [json.loads(l) for l in open(spec["pairs"])]
dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
    "chosen": [{"role": "assistant", "content": r["chosen"]}],
    "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
args = trl.DPOConfig(output_dir=spec["out"], per_device_train_batch_size=4, gradient_accumulation_steps=1,
    max_steps=spec["steps"], learning_rate=5e-5, lr_scheduler_type="cosine", warmup_steps=0.1, beta=0.1,
    gradient_checkpointing=False, max_length=256, precompute_ref_log_probs=pre, disable_dropout=False,
    use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
    dataloader_num_workers=0, seed=0)
ends = []
class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        ends.append(time.perf_counter())
if spec["scenario"] == "lora-simpo":
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    same = {k: getattr(args, k) for k in ("output_dir", "per_device_train_batch_size", "gradient_accumulation_steps",
            "max_steps", "learning_rate", "lr_scheduler_type", "warmup_steps", "beta", "gradient_checkpointing",
            "max_length", "disable_dropout", "use_cpu", "bf16", "report_to", "save_strategy", "logging_steps",
            "disable_tqdm", "dataloader_num_workers", "seed")}
    trainer = CPOTrainer(model=model, args=CPOConfig(**same, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.5),
        train_dataset=dataset, processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
else:
    trainer = trl.DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
        processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
trainer.train()
columns = trainer.train_dataset.column_names
if "chosen_ids" in columns:
    per_pair = [len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trainer.train_dataset]
elif "chosen_input_ids" in columns:  # CPOTrainer's rows hold the prompt
    per_pair = [len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in trainer.train_dataset]
else:
    per_pair = [float("nan")]
report(ends, {"tokens_per_step": 4 * statistics.mean(per_pair)})
"""


# ---------------------------------------------------------------------------------------------------
# The shared model, tokenizer and pairs.

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case "
         "point government company number group problem fact river stone garden window market letter "
         "music paper water light night story answer question reason moment mountain city friend table "
         "color energy system program method result value model train learn write read build carry small "
         "large early young important public bad same able green quiet rapid simple honest careful bright "
         "under over before after during without within across toward").split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def make_pairs(n, seed=0):
    """Rows of the standard format: prompt, chosen, rejected, each ~64 words (~64 tokens)."""
    rng = random.Random(seed)
    return [{"prompt": "Explain this: " + sentence(rng, 60), "chosen": sentence(rng, 62),
             "rejected": sentence(rng, 62)} for _ in range(n)]


def write_tokenizer(folder: Path, texts):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts) + ["system\nuser\nassistant\n"], trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "</s>",
              "add_bos_token": False, "add_eos_token": False, "chat_template": CHATML,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def make_model(folder: Path):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                           sliding_window=None, bos_token_id=1, eos_token_id=3, pad_token_id=2)
    MistralForCausalLM(config).save_pretrained(folder)


def token_stats(folder: Path, pairs):
    sys.path.insert(0, str(ROOT))
    from minidpo.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    p = [len(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                     tokenize=True)) for r in pairs]
    a = [len(tok.encode(r[k], add_special_tokens=False)) for r in pairs for k in ("chosen", "rejected")]
    return statistics.mean(p), statistics.mean(a)


# ---------------------------------------------------------------------------------------------------
# Running and reporting.

def run(provider, scenario, paths, args, tmp: Path):
    out = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{provider}-{scenario}-"))
    spec = {"scenario": scenario, "folder": str(paths["model"]), "pairs": str(paths["pairs"]),
            "out": str(out / "out"), "cache": str(out / "cache"), "steps": args.steps, "warmup": args.warmup,
            "template": CHATML, "targets": TARGETS, "threads": args.threads}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    code = MINIDPO_CHILD if provider == "minidpo" else TRL_CHILD
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env, capture_output=True,
                          text=True, cwd=out)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{provider} {scenario} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def median_of(rows, key):
    return statistics.median(r[key] for r in rows)


def table(results, scenarios):
    gib = 2 ** 30
    lines = ["| scenario | provider | step s (median) | steps/s | vs TRL | peak RSS GiB | vs TRL | "
             "extra peak GiB | vs TRL | tokens/step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for scenario in scenarios:
        trl = results[("trl", scenario)]
        for provider in PROVIDERS:
            rows = results[(provider, scenario)]
            step, peak, extra = (median_of(rows, k) for k in ("step_s", "peak", "extra"))
            t_step, t_peak, t_extra = (median_of(trl, k) for k in ("step_s", "peak", "extra"))
            lines.append(f"| {scenario} | {provider} | {step:.3f} | {1 / step:.2f} | {t_step / step:.2f}x | "
                         f"{peak / gib:.2f} | {peak / t_peak:.2f}x | {extra / gib:.2f} | {extra / t_extra:.2f}x | "
                         f"{median_of(rows, 'tokens_per_step'):.0f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--pairs", type=int, default=40, help="pairs in the data (at least 4 x steps)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="step intervals not timed")
    p.add_argument("--rounds", type=int, default=2, help="subprocesses per (provider, scenario)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in each subprocess (0: torch's default, one per core); on a "
                        "machine shared with other work, 1 gives far steadier numbers")
    args = p.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown or args.pairs < 4 * args.steps or args.steps <= args.warmup + 1:
        p.error(f"unknown scenarios {sorted(unknown)}" if unknown else "need pairs >= 4 x steps > 4 x (warmup + 1)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {"model": tmp / "model", "pairs": tmp / "pairs.jsonl"}
        pairs = make_pairs(args.pairs)
        paths["pairs"].write_text("".join(json.dumps(r) + "\n" for r in pairs))
        make_model(paths["model"])
        write_tokenizer(paths["model"], [r[k] for r in pairs for k in ("prompt", "chosen", "rejected")])
        prompt, answer = token_stats(paths["model"], pairs)
        import torch

        print(f"model: Mistral hidden 256, intermediate 768, 4 layers, 8/2 heads, vocab 32000, fp32; "
              f"{args.pairs} pairs, prompt {prompt:.0f} tokens (with template), answers {answer:.0f} tokens; "
              f"batch 4; {args.steps} steps, {args.warmup} untimed; {args.rounds} rounds; "
              f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {args.threads or torch.get_num_threads()}",
              flush=True)
        results = {}
        for r in range(args.rounds):
            for scenario in scenarios:
                for provider in PROVIDERS:
                    row = run(provider, scenario, paths, args, tmp)
                    row["extra"] = row["peak"] - row["base"]
                    results.setdefault((provider, scenario), []).append(row)
                    print(f"round {r + 1} {scenario:8s} {provider:7s} step {row['step_s']:.3f} s "
                          f"(min {min(row['gaps']):.3f}, max {max(row['gaps']):.3f}), peak "
                          f"{row['peak'] / 2**30:.2f} GiB, base {row['base'] / 2**30:.2f} GiB", flush=True)
        print()
        print(table(results, scenarios))


if __name__ == "__main__":
    main()
