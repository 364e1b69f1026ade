"""The memory plan (`minidpo.memory`, `train --dry-run`): its counts against the model itself, its
peak against peaks measured on CPU (within 20%), and the command that loads nothing."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minidpo.lora import apply_lora, count_trainable
from minidpo.memory import lora_targets, memory_plan, parameter_count, read_model_config
from minidpo.model import Mistral, MistralConfig

T = importlib.import_module("minidpo.train")
ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2)
RATIO = dict(vocab_size=1024, hidden_size=768, intermediate_size=2688, num_hidden_layers=2,
             num_attention_heads=12, num_key_value_heads=3)
SMALL_8K = {**SMALL, "vocab_size": 8000}
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, torch_dtype="bfloat16")


def train_config(**overrides):
    return T.TrainConfig(model="m", data=["d"], out="o", **overrides)


@pytest.mark.parametrize("shape", [SMALL, {**SMALL, "tie_word_embeddings": True}, RATIO])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj", "lm_head")])
def test_counts_equal_the_models_own(shape, targets):
    c = MistralConfig(**shape)
    with torch.device("meta"):
        model = Mistral(c)
    assert parameter_count(c) == model.num_parameters()
    apply_lora(model, r=8, alpha=16.0, targets=targets)
    plan = memory_plan(c, train_config(lora_r=8, lora_targets=list(targets)), device="cpu")
    adapters = next(size for name, size, _ in plan.rows if name == "adapters")
    assert adapters == 16 * count_trainable(model)  # fp32 parameter, gradient, two AdamW moments
    with pytest.raises(ValueError, match="match no Linear"):
        lora_targets(c, ["qproj"])


def test_mistral_7b_numbers():
    """Mistral-7B, LoRA on every projection, bf16 on CUDA: 7.24B parameters (the model card's
    7.24B), 41.9M adapter parameters at r=16 (PEFT prints the same for these targets)."""
    plan = memory_plan(MistralConfig(**MISTRAL_7B), train_config(batch_size=16, grad_accum=16,
                                                                 gradient_checkpointing=True),
                       device="cuda", device_memory=80 << 30)
    rows = {name: size for name, size, _ in plan.rows}
    assert rows["weights"] == 2 * 7_241_732_096
    assert rows["adapters"] == 16 * 41_943_040
    assert plan.fits and plan.activations_checkpointed < plan.activations_plain
    assert "fits in 80.0 GiB: yes" in plan.table()
    big = memory_plan(MistralConfig(**MISTRAL_7B), train_config(batch_size=16), device="cuda",
                      device_memory=80 << 30)
    assert big.fits is False and "NO" in big.table()


# Measured on CPU, one fresh process per config: forked (before any torch op, so no OpenMP pool is
# inherited) from one that imported torch once. Each runs a tiny step first (so code pages and
# runtime buffers are resident), then builds the model and optimizer and runs two DPO steps (the
# second with AdamW's moments allocated) at the longest rows max_length allows. Measured peak:
# VmHWM after a clear_refs reset, minus the RSS before the model was built. glibc maps every buffer
# of 64 KiB or more on its own (MALLOC_MMAP_THRESHOLD_), so freed memory leaves the resident set.
MEASURE = r"""
import copy, gc, importlib, json, os, random, sys
import torch
T = importlib.import_module("minidpo.train")
from minidpo.data import TokenizedPair
from minidpo.model import Mistral, MistralConfig
from minidpo.reference import policy_and_reference

def rss(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))

def run(shape, settings, prompt=4):
    gc.collect()
    base = rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    c = MistralConfig(sliding_window=None, **shape)
    config = T.TrainConfig(model="m", data=["d"], out="o", lr=1e-3, **settings)
    torch.manual_seed(0)
    model = Mistral(c).init_weights(seed=0)
    model, reference = policy_and_reference(model, config)
    optimizer, scheduler = T.build_optimizer(model, config, 10)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(3, c.vocab_size) for _ in range(n)]
    L = config.max_length
    pairs = [TokenizedPair(ids(prompt), ids(L - prompt), ids(L - prompt), "m", i) for i in range(config.batch_size)]
    for step in range(2):
        batch = T.make_batch(pairs, list(range(len(pairs))), 0, "cpu", packed=config.prefix_sharing)
        metrics = T.dpo_step(model, [batch], config, reference)
        T.optimizer_step(params, optimizer, scheduler, metrics, config, step + 1)
    return rss("VmHWM") - base

tiny = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)
peaks = []
for shape, settings in json.loads(sys.argv[1]):
    read, write = os.pipe()
    if os.fork() == 0:
        torch.set_num_threads(1)
        run(tiny, {**settings, "max_length": 16})
        os.write(write, str(run(shape, settings)).encode())
        os._exit(0)
    os.close(write)
    peaks.append(int(os.read(read, 64).decode()))
    os.wait()
print("PEAKS " + json.dumps(peaks))
"""

MEASURED = [  # (name, shape, TrainConfig settings): LoRA with dropout, packed and not, checkpointed, full
    ("lora_packed_dropout", SMALL_8K, dict(max_length=192, batch_size=2, lora_dropout=0.05)),
    ("lora_checkpointed_unshared", RATIO, dict(max_length=192, batch_size=2, lora_dropout=0.0,
                                               gradient_checkpointing=True, prefix_sharing=False)),
    ("full_unshared_7b_ratio", RATIO, dict(max_length=128, batch_size=2, full=True, prefix_sharing=False)),
]


@pytest.fixture(scope="module")
def measured_peaks():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    configs = json.dumps([[shape, settings] for _, shape, settings in MEASURED])
    proc = subprocess.run([sys.executable, "-c", MEASURE, configs], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAKS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return dict(zip([m[0] for m in MEASURED], json.loads(lines[-1][len("PEAKS "):])))


@pytest.mark.parametrize("name,shape,settings", MEASURED, ids=[m[0] for m in MEASURED])
def test_plan_is_within_20_percent_of_the_measured_cpu_peak(measured_peaks, name, shape, settings):
    measured = measured_peaks[name]
    plan = memory_plan(MistralConfig(sliding_window=None, **shape), train_config(lr=1e-3, **settings),
                       device="cpu", threads=1)
    print(f"{name}: planned {plan.peak / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB "
          f"({plan.peak / measured:.2f}x)")
    assert 0.8 <= plan.peak / measured <= 1.2, f"planned {plan.peak / 2**20:.0f} MiB, measured " \
                                               f"{measured / 2**20:.0f} MiB\n{plan.table()}"


# ---------------------------------------------------------------------------------------------------
# The command.

def _dry_run(args, **env):
    return subprocess.run([sys.executable, "-m", "minidpo", "train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})


def test_dry_run_reads_only_config_json_and_writes_nothing(tmp_path):
    folder = tmp_path / "model"  # a config.json and no weights at all: nothing else may be read
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**MISTRAL_7B, "model_type": "mistral"}))
    out = tmp_path / "out"
    proc = _dry_run(["--model", str(folder), "--data", str(tmp_path / "missing.jsonl"), "--out", str(out),
                     "--dry-run", "--device", "cuda", "--batch-size", "16", "--grad-accum", "8",
                     "--gradient-checkpointing", "--device-memory", "24"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "memory plan per cuda device" in proc.stdout and "| weights | 13.49 |" in proc.stdout
    assert "without gradient checkpointing" in proc.stdout and "fits in 24.0 GiB: yes" in proc.stdout
    assert not out.exists()
    proc = _dry_run(["--model", str(folder), "--data", "x", "--out", str(out), "--dry-run", "--device", "cuda",
                     "--device-memory", "16"])
    assert proc.returncode == 0 and "fits in 16.0 GiB: NO" in proc.stdout, proc.stdout + proc.stderr


def test_dry_run_errors_are_clear(tmp_path):
    proc = _dry_run(["--model", "nobody/no-such-model", "--data", "x", "--out", str(tmp_path / "o"), "--dry-run"],
                    HF_HUB_OFFLINE="1")
    assert proc.returncode == 1 and "cannot read config.json of nobody/no-such-model" in proc.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4,
                                                 "num_key_value_heads": 3}))
    proc = _dry_run(["--model", str(bad), "--data", "x", "--out", str(tmp_path / "o"), "--dry-run"])
    assert proc.returncode == 1 and "not a multiple of num_key_value_heads" in proc.stderr, proc.stderr
    with pytest.raises(FileNotFoundError, match="no config.json"):
        read_model_config(tmp_path)


def test_nf4_weights_equal_the_quantized_models_bytes():
    """--quantize nf4: the plan's weights are the bytes an NF4-quantized model holds (Linear weights
    but the head in 4.127 bits, the rest in the compute dtype), within rounding."""
    from minidpo.quant import is_quantized, quantizable, quantize_nf4

    c = MistralConfig(**{**SMALL_8K, "torch_dtype": "bfloat16"})
    model = Mistral(c).to(torch.bfloat16)
    with torch.no_grad():
        nf4 = {name: quantize_nf4(model.get_submodule(name.removesuffix(".weight")).weight, double_quant=True)
               for name in quantizable(model)}
    held = sum(w.nbytes() for w in nf4.values()) + sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if n not in nf4)
    plan = memory_plan(c, train_config(quantize="nf4", dtype="bfloat16"), device="cpu")
    planned = next(size for name, size, _ in plan.rows if name == "weights")
    assert abs(planned - held) <= 0.001 * held, (planned, held)
    assert not is_quantized(model)
