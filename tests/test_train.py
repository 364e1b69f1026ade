"""The training loop: invariants (ln 2 at the first step, 4 x 1 == 1 x 4), learning, resume, signals,
NaN, the precomputed reference, the output folder and the command line, on a tiny random Mistral."""
import dataclasses
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_hf_mistral, write_tokenizer_folder
from minidpo import load_model
from minidpo import config as C
from minidpo import reference as REF
from minidpo.lora import PEFT_PREFIX, load_lora, lora_layers
from minidpo.refcache import ReferenceCache, weights_digest
from minidpo.tokenizer import load_tokenizer

# The module, not the function: `minidpo.train` may name the function once the package exports it.
T = importlib.import_module("minidpo.train")
REPO = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
TRAIN_KEYS = {"step", "epoch", "examples", "tokens", "loss", "rewards/chosen", "rewards/rejected",
              "rewards/accuracy", "rewards/margin", "logps/chosen", "logps/rejected", "lr", "grad_norm",
              "step_time_s"}
EVAL_KEYS = {"step", "eval/loss", "eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/accuracy",
             "eval/rewards/margin", "eval/logps/chosen", "eval/logps/rejected", "eval/examples"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random Mistral folder with a ChatML tokenizer, and 8 trivially learnable pairs."""
    root = tmp_path_factory.mktemp("train")
    make_hf_mistral(root / "model", **TINY)
    write_tokenizer_folder(root / "model")
    rows = [{"prompt": f"What is {i} plus 30?", "chosen": f"The answer is {i + 30}.",
             "rejected": "pear, apple, fig, banana."} for i in range(8)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_config(world, out, **overrides) -> T.TrainConfig:
    settings = dict(model=str(world / "model"), data=[str(world / "pairs.jsonl")], out=str(out),
                    max_length=48, batch_size=4, grad_accum=1, lr=1e-2, warmup_ratio=0.0, max_steps=3,
                    lora_r=4, lora_alpha=8.0, lora_dropout=0.0, ref_cache_dir=str(world / "refcache"))
    return T.TrainConfig(**{**settings, **overrides})


def records(out) -> list:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def train_records(out) -> list:
    return [r for r in records(out) if "loss" in r]


def adapter(out) -> dict:
    return load_file(str(Path(out) / "final" / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------
# Invariants.

@pytest.mark.parametrize("full", [False, True])
def test_first_step_loss_is_ln2_and_rewards_zero(world, tmp_path, full):
    # LoRA with dropout on: B = 0 makes the policy the base exactly, dropout or not.
    summary = T.train(make_config(world, tmp_path / "out", full=full, lora_dropout=0.1, max_steps=1))
    first = train_records(tmp_path / "out")[0]
    assert summary["status"] == "finished" and summary["steps"] == 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert abs(first[key]) < 1e-7, key
    assert first["grad_norm"] > 0


def micro_batches(pairs, sizes, pad_id):
    out, start = [], 0
    for n in sizes:
        out.append(T.make_batch(pairs, list(range(start, start + n)), pad_id, torch.device("cpu")))
        start += n
    return out


@pytest.mark.parametrize("full, loss", [(False, "sigmoid"), (True, "sigmoid"), (False, "orpo")])
def test_grad_accum_4x1_equals_1x4(world, tmp_path, full, loss):
    # orpo: its NLL is per chosen token of the whole step, however the step is split
    config = make_config(world, tmp_path / "out", full=full, loss=loss)
    tokenizer = load_tokenizer(world / "model")
    pairs, _ = T.prepare_data(config, tokenizer)
    model, reference = T.build_models(config, world / "model", torch.device("cpu"), torch.float32)
    with torch.no_grad():  # B = 0 would leave A without gradient: give the adapters some weight
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.05)
    grads, metrics = [], []
    for sizes in ([4], [1, 1, 1, 1]):
        model.zero_grad(set_to_none=True)
        metrics.append(T.dpo_step(model, micro_batches(pairs, sizes, tokenizer.pad_id), config, reference))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, g in grads[0].items():
        scale = g.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6 * scale, msg=name)
    assert metrics[0].keys() == metrics[1].keys() >= set(T.DPO_SUMS)
    for key in metrics[0]:
        torch.testing.assert_close(metrics[1][key], metrics[0][key], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(world, tmp_path):
    grads = []
    for flag in (False, True):
        config = make_config(world, tmp_path / "out", gradient_checkpointing=flag)
        tokenizer = load_tokenizer(world / "model")
        pairs, _ = T.prepare_data(config, tokenizer)
        torch.manual_seed(0)  # the same LoRA init both times
        model, reference = T.build_models(config, world / "model", torch.device("cpu"), torch.float32)
        assert model.gradient_checkpointing is flag
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.normal_(std=0.05)
        T.dpo_step(model, micro_batches(pairs, [4], tokenizer.pad_id), config, reference)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_grad_accum_through_train(world, tmp_path):
    T.train(make_config(world, tmp_path / "a", grad_accum=1, max_steps=2))
    T.train(make_config(world, tmp_path / "b", grad_accum=4, max_steps=2))
    a, b = train_records(tmp_path / "a"), train_records(tmp_path / "b")
    for ra, rb in zip(a, b):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "grad_norm", "tokens", "examples"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key
    wa, wb = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6)


def test_lr_schedule():
    f = lambda s, sched: T.lr_factor(s, total=10, warmup=2, schedule=sched)  # noqa: E731
    assert [f(s, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert f(2, "cosine") == 1.0 and f(6, "cosine") == pytest.approx(0.5)
    assert f(6, "linear") == pytest.approx(0.5) and f(9, "linear") == pytest.approx(1 / 8)


# ---------------------------------------------------------------------------------------------------
# Learning.

def test_dpo_loss_decreases_and_eval_is_recorded(world, tmp_path):
    out = tmp_path / "out"
    T.train(make_config(world, out, max_steps=8, eval_fraction=0.25, eval_every=4, lora_dropout=0.05,
                          lr=3e-2, schedule="constant", beta=0.5))
    rows = records(out)
    train, evals = [r for r in rows if "loss" in r], [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(set(r) == TRAIN_KEYS for r in train)
    assert [r["step"] for r in evals] == [4, 8] and all(set(r) == EVAL_KEYS for r in evals)
    assert max(r["loss"] for r in train[-4:]) < 0.6 * train[0]["loss"]
    assert train[-1]["rewards/accuracy"] == 1.0 and train[-1]["rewards/margin"] > 0
    assert evals[-1]["eval/rewards/accuracy"] == 1.0 and evals[-1]["eval/loss"] < math.log(2)
    # 6 training pairs in batches of 4: two steps (4 + 2 pairs) per epoch
    assert train[-1]["examples"] == 4 * 6 and train[-1]["epoch"] == pytest.approx(8 / 2)
    tokens = [r["tokens"] for r in train]
    assert all(b > a for a, b in zip(tokens, tokens[1:]))


@pytest.mark.parametrize("full, lr, factor", [(True, 1e-2, 0.75), (False, 3e-2, 0.95)])
def test_sft_reduces_nll(world, tmp_path, full, lr, factor):
    # NLL starts near ln(400) = 6.0 (random model, vocabulary 400); rank-4 LoRA on width 32 learns slowly
    out = tmp_path / "out"
    T.train(make_config(world, out, mode="sft", full=full, max_steps=8, lr=lr, eval_fraction=0.25))
    rows = records(out)
    train = [r for r in rows if "loss" in r]
    assert set(train[0]) == {"step", "epoch", "examples", "tokens", "loss", "lr", "grad_norm", "step_time_s"}
    assert train[0]["loss"] == pytest.approx(math.log(400), abs=0.3)
    assert train[-1]["loss"] < factor * train[0]["loss"]
    assert set(rows[-1]) == {"step", "eval/loss", "eval/examples"} and rows[-1]["eval/loss"] < train[0]["loss"]


# ---------------------------------------------------------------------------------------------------
# Resume, signals, NaN.

CHILD = textwrap.dedent("""
    import importlib, json, os, signal, sys, time
    T = importlib.import_module("minidpo.train")
    config = T.TrainConfig(**json.loads(sys.argv[1]))
    at, how = int(sys.argv[2]), sys.argv[3]
    real, calls = T.dpo_step, [0]
    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            print("in step", at, flush=True)
            time.sleep(4)  # the parent's signal lands inside this step
        return real(*args, **kwargs)
    T.dpo_step = step
    sys.exit(T.cli(importlib.import_module("minidpo.config").config_argv(config), command="train"))
""")


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):
    """An uninterrupted 5-step run (two epochs and a bit, accumulation, dropout): the reference."""
    out = tmp_path_factory.mktemp("straight") / "out"
    config = make_config(world, out, max_steps=5, grad_accum=2, lora_dropout=0.1, warmup_ratio=0.2)
    T.train(config)
    return config, out


def start_child(config, at, how):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    payload = json.dumps(dataclasses.asdict(config))
    return subprocess.Popen([sys.executable, "-c", CHILD, payload, str(at), how], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def assert_same_run(out, reference_out):
    a, b = train_records(out), train_records(reference_out)
    assert [r["step"] for r in a] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k != "step_time_s"} == \
               {k: v for k, v in rb.items() if k != "step_time_s"}
    wa, wb = adapter(out), adapter(reference_out)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_resume_after_kill_is_identical(straight, tmp_path):
    config, reference_out = straight
    config = dataclasses.replace(config, out=str(tmp_path / "out"), save_every=2)
    child = start_child(config, at=4, how="kill")  # SIGKILL as step 4 begins: step 3 is logged, not saved
    _, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err
    assert [r["step"] for r in train_records(config.out)] == [1, 2, 3]
    assert [p.name for p in T.checkpoints(Path(config.out))] == ["step-2"]
    summary = T.train(dataclasses.replace(config, resume=True))
    assert summary["status"] == "finished" and summary["steps"] == 5
    assert_same_run(config.out, reference_out)


def test_sigterm_checkpoints_and_resumes(straight, tmp_path):
    config, reference_out = straight
    config = dataclasses.replace(config, out=str(tmp_path / "out"))  # save_every=0: only the signal saves
    child = start_child(config, at=3, how="wait")
    assert child.stdout.readline().strip() == "in step 3"
    os.kill(child.pid, signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM after step 3" in err and "--resume" in err
    assert [p.name for p in T.checkpoints(Path(config.out))] == ["step-3"]
    assert not (Path(config.out) / "final").exists()
    T.train(dataclasses.replace(config, resume=True))
    assert_same_run(config.out, reference_out)


# ---------------------------------------------------------------------------------------------------
# Reference-free losses (simpo, cpo, orpo): no reference model, no reference pass.

def count_passes(monkeypatch) -> dict:
    """Counts every forward of a minidpo Mistral (each goes through `hidden_states`) and every
    reference pass or adapters-off switch of the loop."""
    from minidpo.model import Mistral

    counts = {"forward": 0, "reference": 0, "adapters_off": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(Mistral, "hidden_states", counting("forward", Mistral.hidden_states))
    monkeypatch.setattr(T, "reference_logps", counting("reference", T.reference_logps))
    monkeypatch.setattr(REF, "lora_disabled", counting("adapters_off", REF.lora_disabled))
    return counts


@pytest.mark.parametrize("full", [False, True])
def test_reference_free_run_has_no_reference_pass(world, tmp_path, monkeypatch, full):
    counts = count_passes(monkeypatch)
    settings = dict(full=full, max_steps=3, eval_fraction=0.25, eval_every=2, lr=1e-3 if full else 1e-2,
                    ref_cache_dir=str(tmp_path / "cache"))
    T.train(make_config(world, tmp_path / "dpo", **settings))
    dpo = dict(counts)
    counts.update(forward=0, reference=0, adapters_off=0)
    summary = T.train(make_config(world, tmp_path / "orpo", loss="orpo", beta=0.2, **settings))
    # 3 steps of 1 micro-batch and 2 evals of 1 micro-batch: DPO runs the policy and the reference each time
    assert dpo == {"forward": 2 * 5, "reference": 5, "adapters_off": 0 if full else 5}
    assert counts == {"forward": 5, "reference": 0, "adapters_off": 0}
    assert summary["reference_computed"] == 0 and not (tmp_path / "cache").exists()
    rows = records(tmp_path / "orpo")
    train, evals = [r for r in rows if "loss" in r], [r for r in rows if "eval/loss" in r]
    orpo_keys = {"nll_loss", "log_odds_ratio", "log_odds_chosen"}
    assert all(set(r) == TRAIN_KEYS | orpo_keys for r in train)
    assert all(set(r) == EVAL_KEYS | {f"eval/{k}" for k in orpo_keys} for r in evals) and len(evals) == 2
    # ORPO's loss is the NLL per chosen token minus beta x mean log σ(log odds ratio)
    for r in train:
        assert r["loss"] == pytest.approx(r["nll_loss"] - 0.2 * r["log_odds_ratio"], rel=1e-5)
        assert r["rewards/chosen"] == pytest.approx(0.2 * r["logps/chosen"], rel=1e-5)  # beta x average log-prob
    _, reference = T.build_models(make_config(world, tmp_path / "x", full=full, loss="simpo"), world / "model",
                                  torch.device("cpu"), torch.float32)
    assert reference is None  # not even a full fine-tune keeps a copy


@pytest.fixture(scope="module")
def straight_orpo(world, tmp_path_factory):
    """The `straight` run with the reference-free ORPO loss."""
    out = tmp_path_factory.mktemp("straight-orpo") / "out"
    config = make_config(world, out, loss="orpo", max_steps=5, grad_accum=2, lora_dropout=0.1, warmup_ratio=0.2)
    T.train(config)
    return config, out


def test_reference_free_resume_after_kill_is_identical(straight_orpo, tmp_path):
    config, reference_out = straight_orpo
    config = dataclasses.replace(config, out=str(tmp_path / "out"), save_every=2)
    child = start_child(config, at=4, how="kill")
    _, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err
    assert [p.name for p in T.checkpoints(Path(config.out))] == ["step-2"]
    T.train(dataclasses.replace(config, resume=True))
    assert_same_run(config.out, reference_out)
    assert "nll_loss" in train_records(config.out)[0]


def test_nan_loss_stops_naming_the_step(world, tmp_path, monkeypatch):
    real, calls = T.dpo_loss, [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1
        result = real(*args, **kwargs)
        if calls[0] == 3:
            return result._replace(losses=result.losses * float("nan"))
        return result

    monkeypatch.setattr(T, "dpo_loss", poisoned)
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match=r"step 3: loss nan.*step-2"):
        T.train(make_config(world, out, max_steps=5, save_every=1))
    assert [p.name for p in T.checkpoints(out)] == ["step-1", "step-2"]
    assert [r["step"] for r in records(out)] == [1, 2]
    assert not (out / "final").exists()


def test_resume_refuses_other_settings_and_reuse_of_out(world, tmp_path):
    out = tmp_path / "out"
    T.train(make_config(world, out, max_steps=1, save_every=1))
    with pytest.raises(ValueError, match="already holds a run"):
        T.train(make_config(world, out, max_steps=1))
    with pytest.raises(ValueError, match=r"lr: 0.01 -> 0.02"):
        T.train(make_config(world, out, max_steps=1, lr=2e-2, resume=True))


# ---------------------------------------------------------------------------------------------------
# The precomputed reference.

def test_precomputed_reference_matches_adapter_off_and_is_reused(world, tmp_path):
    cache = tmp_path / "cache"
    live = T.train(make_config(world, tmp_path / "live", max_steps=3, lora_dropout=0.1))
    first = T.train(make_config(world, tmp_path / "pre", max_steps=3, lora_dropout=0.1,
                                reference="precomputed", ref_cache_dir=str(cache)))
    assert live["reference_computed"] == 0 and first["reference_computed"] == 8
    for a, b in zip(train_records(tmp_path / "live"), train_records(tmp_path / "pre")):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    wa, wb = adapter(tmp_path / "live"), adapter(tmp_path / "pre")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6)
    shards = sorted(cache.rglob("refs-*.safetensors"))
    assert len(shards) == 1
    # A nested subset (and an eval split) of the same data: nothing is computed again.
    again = T.train(make_config(world, tmp_path / "half", max_steps=1, fraction=0.5, eval_fraction=0.25,
                                reference="precomputed", ref_cache_dir=str(cache)))
    assert again["reference_computed"] == 0 and sorted(cache.rglob("refs-*.safetensors")) == shards
    # Another tokenisation setting is another key: computed afresh, in its own folder.
    other = T.train(make_config(world, tmp_path / "other", max_steps=1, max_length=40,
                                reference="precomputed", ref_cache_dir=str(cache)))
    assert other["reference_computed"] == 8 and len(list(cache.glob("*/key.json"))) == 2


def test_cached_values_equal_a_direct_reference_pass(world, tmp_path):
    config = make_config(world, tmp_path / "out", reference="precomputed", ref_cache_dir=str(tmp_path / "c"))
    tokenizer = load_tokenizer(world / "model")
    pairs, _ = T.prepare_data(config, tokenizer)
    model, _ = T.build_models(config, world / "model", torch.device("cpu"), torch.float32)
    table, computed = T.precomputed_reference(config, world / "model", tokenizer, model, pairs,
                                              torch.device("cpu"), torch.float32)
    assert computed == len(pairs)
    for i in range(len(pairs)):  # one pair at a time: no padding at all
        batch = T.make_batch(pairs, [i], tokenizer.pad_id, torch.device("cpu"))
        direct = T.reference_logps(model, None, batch, average=False)
        torch.testing.assert_close(table[i], direct, rtol=1e-5, atol=1e-5)
    again, computed = T.precomputed_reference(config, world / "model", tokenizer, model, pairs,
                                              torch.device("cpu"), torch.float32)
    assert computed == 0 and torch.equal(again, table)


def test_reference_cache_key_is_checked_and_weights_identify_the_model(world, tmp_path):
    cache = ReferenceCache(tmp_path, {"weights": "a", "max_length": 48})
    tokenizer = load_tokenizer(world / "model")
    pairs, _ = T.prepare_data(make_config(world, tmp_path / "o"), tokenizer)
    cache.store(pairs[:2], torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]))
    table, missing = cache.lookup(pairs[:3])
    assert missing == [2] and table[:2].tolist() == [[-1.0, -2.0], [-3.0, -4.0]]
    (cache.folder / "key.json").write_text(json.dumps({"weights": "b", "max_length": 48}))
    with pytest.raises(ValueError, match="holds key"):
        cache.lookup(pairs)
    # Same shapes, other values (e.g. an SFT warm start of the same base): another digest.
    make_hf_mistral(tmp_path / "other", seed=1, **TINY)
    assert weights_digest(tmp_path / "other") != weights_digest(world / "model")
    assert weights_digest(world / "model") == weights_digest(world / "model")


# ---------------------------------------------------------------------------------------------------
# The output folder.

def test_lora_final_loads_in_peft_and_minidpo(world, straight):
    from peft import PeftModel
    from transformers import MistralForCausalLM

    _, out = straight
    final = Path(out) / "final"
    weights = adapter(out)
    assert any(k.endswith("lora_B.weight") and k.startswith(PEFT_PREFIX) and w.abs().max() > 0
               for k, w in weights.items())
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 3]])
    ours = load_lora(load_model(world / "model"), final).eval()  # LoRA layers are added in train mode
    hf = PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(world / "model"), final).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
        base = load_model(world / "model")(ids)
    assert not torch.allclose(ours(ids), base, atol=1e-4)
    checkpoint = json.loads((Path(out) / "config.json").read_text())
    assert checkpoint == dataclasses.asdict(straight[0])


def test_full_final_is_a_model_folder(world, tmp_path):
    from transformers import MistralForCausalLM

    out = tmp_path / "out"
    T.train(make_config(world, out, full=True, max_steps=2, lr=1e-3, save_every=1, keep_checkpoints=1))
    assert [p.name for p in T.checkpoints(out)] == ["step-2"]
    saved = load_file(str(out / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in saved and "lm_head.weight" in saved
    ours = load_model(out / "final")
    assert (out / "final" / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 3]])
    with torch.no_grad():
        logits = ours(ids)
        torch.testing.assert_close(logits, MistralForCausalLM.from_pretrained(out / "final")(ids).logits,
                                   rtol=1e-4, atol=1e-4)
        assert not torch.allclose(logits, load_model(world / "model")(ids), atol=1e-4)
    for name, w in ours.state_dict().items():
        torch.testing.assert_close(w, saved[name], msg=name)


# ---------------------------------------------------------------------------------------------------
# Configuration and command line.

def test_reference_free_config_and_cli(world, tmp_path):
    simpo = make_config(world, tmp_path, loss="simpo", simpo_gamma=1.2, beta=2.0)
    assert (T.reference_mode(simpo), simpo.cpo_alpha) == (None, 0.0)  # plain SimPO: no NLL
    cpo = make_config(world, tmp_path, loss="cpo")
    assert (T.reference_mode(cpo), cpo.cpo_alpha) == (None, 1.0)  # TRL's CPOConfig default
    assert make_config(world, tmp_path).cpo_alpha == 0.0
    for config in (simpo, cpo, make_config(world, tmp_path, loss="simpo", cpo_alpha=0.3, label_smoothing=0.1)):
        assert C.parse_config(C.config_argv(config)) == config
    parsed = T.parse_config(["--model", "m", "--data", "d", "--out", "o", "--loss", "orpo", "--beta", "0.25"])
    assert (parsed.loss, parsed.beta, T.reference_mode(parsed)) == ("orpo", 0.25, None)
    text = C.build_parser().format_help()
    assert "--simpo-gamma" in text and "--cpo-alpha" in text and "simpo, cpo, orpo use no reference" in text
    with pytest.raises(SystemExit):
        T.parse_config(["--model", "m", "--data", "d", "--out", "o", "--loss", "simpo", "--reference", "copy"])


def test_cli_round_trip(world, tmp_path):
    config = make_config(world, tmp_path, lora_targets=["q_proj", "v_proj"], full=False, beta=0.25,
                         loss="robust", label_smoothing=0.1, schedule="linear", grad_accum=2,
                         group_by_length=False, reference="precomputed", seed=7, template="chatml",
                         gradient_checkpointing=True, save_every=3, eval_fraction=0.1)
    assert C.parse_config(C.config_argv(config)) == config
    sft = T.parse_config(["--model", "m", "--data", "a.jsonl", "b::standard", "--out", "o", "--lora-r", "8",
                          "--lora-targets", "q_proj,k_proj", "--no-group-by-length", "--full"], command="sft")
    assert (sft.mode, sft.data, sft.lora_r, sft.lora_targets, sft.group_by_length, sft.full) == \
           ("sft", ["a.jsonl", "b::standard"], 8, ["q_proj", "k_proj"], False, True)
    assert sft.lr == T.TrainConfig.__dataclass_fields__["lr"].default
    text = C.build_parser().format_help()
    for flag in ("--lora-alpha", "--max-prompt-length", "--reference", "--no-prefix-sharing", "--resume"):
        assert flag in text
    assert "DPO temperature beta" in text  # help comes from the field's metadata
    with pytest.raises(SystemExit):
        T.parse_config(["--model", "m", "--data", "d", "--out", "o", "--batch-size", "6", "--grad-accum", "4"])


@pytest.mark.parametrize("bad, match", [
    (dict(batch_size=6, grad_accum=4), "not a multiple"),
    (dict(fraction=0.0), "fraction=0.0"),
    (dict(eval_fraction=1.0), "eval_fraction=1.0"),
    (dict(loss="kto"), "loss='kto'"),
    (dict(full=True, reference="adapter-off"), "needs LoRA"),
    (dict(max_prompt_length=48), "max_prompt_length=48"),
    (dict(loss="hinge", label_smoothing=0.1), "label_smoothing is not defined for loss_type 'hinge'"),
    (dict(loss="ipo", label_smoothing=0.1), "label_smoothing is not defined for loss_type 'ipo'"),
    (dict(loss="exo_pair"), "exo_pair needs label_smoothing > 0"),
    (dict(loss="simpo", reference="copy"), "reference='copy': loss 'simpo' uses no reference"),
    (dict(loss="orpo", reference="precomputed"), "reference='precomputed': loss 'orpo' uses no reference"),
    (dict(simpo_gamma=1.0), "simpo_gamma is SimPO's margin"),
    (dict(cpo_alpha=1.0), "cpo_alpha weighs the NLL of cpo and simpo"),
    (dict(loss="cpo", rpo_alpha=0.5), "rpo_alpha is for the losses with a reference"),
])
def test_config_validation(world, tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        make_config(world, tmp_path, **bad)


def test_main_dispatches_train_and_sft(capsys):
    from minidpo.__main__ import main

    for command in ("train", "sft"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"python -m minidpo {command}" in capsys.readouterr().out


def test_rpo_adds_the_chosen_per_token_nll(world, tmp_path):
    # RPO as TRL computes it: loss = DPO + alpha * (NLL of the batch's chosen tokens / their number),
    # computed here by hand; spread over the pairs as -alpha * NLL_i * pairs / tokens.
    config = make_config(world, tmp_path / "out")
    tokenizer = load_tokenizer(world / "model")
    pairs, _ = T.prepare_data(config, tokenizer)
    model, reference = T.build_models(config, world / "model", torch.device("cpu"), torch.float32)
    batch = T.make_batch(pairs, [0, 1, 2], tokenizer.pad_id, torch.device("cpu"))
    plain, logps = T.dpo_forward(model, reference, batch, config)
    rpo, _ = T.dpo_forward(model, reference, batch, make_config(world, tmp_path / "o2", rpo_alpha=0.5))
    logits = model(batch["input_ids"][:3], batch["attention_mask"][:3]).double()
    labels = batch["labels"][:3, 1:]
    scored = labels != -100
    token_logp = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    nll = -(token_logp * scored).sum(-1)
    torch.testing.assert_close(rpo.losses.double(), plain.losses.double() + 0.5 * nll * 3 / scored.sum(),
                               rtol=1e-5, atol=1e-6)
    assert rpo.loss.item() == pytest.approx(plain.loss.item() + 0.5 * nll.sum().item() / scored.sum().item(),
                                            rel=1e-5)
    assert rpo.metrics["nll_loss"].mean().item() == pytest.approx(nll.sum().item() / scored.sum().item(), rel=1e-5)
