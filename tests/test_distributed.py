"""torchrun training on CPU with the gloo backend and 2 processes, against a one-process run with the
same global batch: every step's metrics, the eval, the final adapter or model (<= 1e-5); FSDP2 full
fine-tunes, a run killed mid-way and resumed; shared precomputed references; a dead or hung rank
ending the job."""
import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_hf_mistral, write_tokenizer_folder
from minidpo.distributed import Dist, share
from minidpo import config as C
from minidpo.scoring import BatchLogpsModule
from minidpo.refcache import ReferenceCache

T = importlib.import_module("minidpo.train")
REPO = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)

pytestmark = pytest.mark.usefixtures("one_thread")

# Runs `python -m minidpo COMMAND` with a fault on one rank: FAULT=die (rank 1 exits at its 2nd
# step), hang (rank 1 sleeps past --dist-timeout at its 2nd step), crash (rank 0 is SIGKILLed at its
# 3rd step, after the step-2 checkpoint: the job dies as a machine would).
FAULT = r"""
import importlib, os, signal, sys, time
T = importlib.import_module("minidpo.train")
real, calls = T.dpo_step, [0]
def step(model, micro_batches, config, reference=None, d=T.ONE):
    calls[0] += 1
    fault = os.environ["FAULT"]
    if fault == "die" and d.rank == 1 and calls[0] == 2:
        os._exit(3)
    if fault == "hang" and d.rank == 1 and calls[0] == 2:
        time.sleep(float(os.environ["HANG_S"]))
    if fault == "crash" and d.rank == 0 and calls[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(model, micro_batches, config, reference, d)
T.dpo_step = step
sys.exit(T.cli(sys.argv[2:], command=sys.argv[1]))
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random Mistral folder with a ChatML tokenizer and 9 pairs (the last batch is partial,
    and its last micro-batch has fewer pairs than there are processes)."""
    root = tmp_path_factory.mktemp("dist")
    make_hf_mistral(root / "model", **TINY)
    write_tokenizer_folder(root / "model")
    rows = [{"prompt": f"What is {i} plus 30?", "chosen": f"The answer is {i + 30}.",
             "rejected": "pear, apple, fig, banana. " * (1 + i % 3)} for i in range(9)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "fault.py").write_text(FAULT)
    return root


def make_config(world, out, **overrides) -> T.TrainConfig:
    settings = dict(model=str(world / "model"), data=[str(world / "pairs.jsonl")], out=str(out),
                    max_length=48, batch_size=4, grad_accum=2, lr=1e-2, warmup_ratio=0.0, epochs=2,
                    lora_r=4, lora_alpha=8.0, lora_dropout=0.0, ref_cache_dir=str(Path(out) / "refcache"))
    return T.TrainConfig(**{**settings, **overrides})


def torchrun(config: T.TrainConfig, *, script=None, env=None, timeout=240) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 -m minidpo train|sft <config's flags>` (or `script` with them)."""
    command = "train" if config.mode == "dpo" else "sft"
    target = [str(script), command] if script else ["-m", "minidpo", command]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *target, *C.config_argv(config)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def records(out) -> list:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_records(one: list, two: list) -> None:
    assert len(one) == len(two) and len(one) > 1
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            if key != "step_time_s":
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)


def assert_same_tensors(one: dict, two: dict) -> None:
    assert one.keys() == two.keys() and one
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=0, atol=1e-5), name


def check_ran(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


# ---------------------------------------------------------------------------------------------------

def test_share_gives_every_pair_once_and_pads_with_weight_zero():
    ranks = [Dist(rank=r, world=3) for r in range(3)]
    parts = [share(list(range(10, 17)), d) for d in ranks]
    assert sorted(i for part, w in parts for i in part) == list(range(10, 17))
    assert all(w == 1.0 for _, w in parts)
    small = [share([5, 6], d) for d in ranks]
    assert small == [([5], 1.0), ([6], 1.0), ([5], 0.0)]


def test_micro_batch_must_split_evenly_across_processes(world, tmp_path):
    config = make_config(world, tmp_path / "out", batch_size=6, grad_accum=2)
    with pytest.raises(ValueError, match="3 pairs per micro-batch cannot be shared by 2 processes"):
        T._train(config, Dist(world=2))


def test_lora_ddp_killed_and_resumed_matches_one_process(world, tmp_path):
    config = make_config(world, tmp_path / "one", eval_fraction=0.2, save_every=1, prefix_sharing=False)
    T.train(config)
    two = dataclasses.replace(config, out=str(tmp_path / "two"))
    assert torchrun(two, script=world / "fault.py", env={"FAULT": "crash"}).returncode != 0
    step2 = Path(two.out) / "checkpoints" / "step-2"
    assert (step2 / "trainable.safetensors").is_file() and not (step2 / "sharded").exists()
    check_ran(torchrun(dataclasses.replace(two, resume=True)))
    assert_same_records(records(config.out), records(two.out))
    evals = [r for r in records(two.out) if "eval/loss" in r]
    assert evals and evals[-1]["eval/examples"] == 2
    adapter = "final/adapter_model.safetensors"
    assert_same_tensors(load_file(f"{config.out}/{adapter}"), load_file(f"{two.out}/{adapter}"))


def test_gradients_are_reduced_once_per_step_not_per_micro_batch(world, tmp_path):
    """DDP's buckets are all-reduced on the step's last micro-batch only (a one-process group here;
    the hook counts the reductions DDP launches)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        config = make_config(world, tmp_path / "out", grad_accum=4)
        tokenizer = T.load_tokenizer(world / "model")
        pairs, _ = T.prepare_data(config, tokenizer)
        net, _ = T.build_models(config, world / "model", torch.device("cpu"), torch.float32)
        model = T.distributed.wrap(BatchLogpsModule(net), Dist(world=2), full=False)
        reductions = []

        def count(state, bucket):
            reductions.append(bucket.index())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        model.register_comm_hook(None, count)
        batches = T.step_batches(pairs, [0, 1, 2, 3], config, tokenizer.pad_id, "cpu", d=Dist(world=1))
        assert len(batches) == 4
        T.dpo_step(model, batches, config)
        assert reductions and len(reductions) == len(set(reductions))  # each bucket once
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()


def test_sft_matches_one_process(world, tmp_path):
    config = make_config(world, tmp_path / "one", mode="sft", batch_size=2, grad_accum=1, epochs=1)
    T.train(config)
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # rank 0 alone writes trackers' files
    two = dataclasses.replace(config, out=str(tmp_path / "two"), report_to=["tensorboard" if tensorboard else "none"])
    check_ran(torchrun(two))
    assert_same_records(records(config.out), records(two.out))
    adapter = "final/adapter_model.safetensors"
    assert_same_tensors(load_file(f"{config.out}/{adapter}"), load_file(f"{two.out}/{adapter}"))
    assert len(list(Path(two.out).glob("tensorboard/events.out.tfevents.*"))) == (1 if tensorboard else 0)


def test_reference_free_orpo_matches_one_process(world, tmp_path):
    # ORPO's NLL is per chosen token of the whole step: the ranks sum their token counts (a stand-in
    # pair, `real` 0.0, counts none) before any rank's loss is formed
    config = make_config(world, tmp_path / "one", loss="orpo", beta=0.2, eval_fraction=0.2)
    T.train(config)
    two = dataclasses.replace(config, out=str(tmp_path / "two"))
    check_ran(torchrun(two))
    assert_same_records(records(config.out), records(two.out))
    assert "nll_loss" in records(two.out)[0] and not Path(config.ref_cache_dir).exists()


def test_precomputed_reference_is_computed_in_parallel_and_shared(world, tmp_path):
    config = make_config(world, tmp_path / "one", reference="precomputed", prefix_sharing=True,
                         eval_fraction=0.2)
    summary = T.train(config)
    two = dataclasses.replace(config, out=str(tmp_path / "two"), ref_cache_dir=str(tmp_path / "two-cache"))
    check_ran(torchrun(two))
    assert_same_records(records(config.out), records(two.out))
    stored = [cache_of(c).load() for c in (config, two)]
    assert len(stored[0]) == len(stored[1]) == summary["reference_computed"] == 9
    for digest, values in stored[0].items():
        assert stored[1][digest] == pytest.approx(values, abs=1e-5)


def cache_of(config: T.TrainConfig) -> ReferenceCache:
    folders = [p for p in Path(config.ref_cache_dir).iterdir() if p.is_dir()]
    assert len(folders) == 1  # one key; rank 0 alone wrote it
    cache = ReferenceCache(config.ref_cache_dir, json.loads((folders[0] / "key.json").read_text()))
    assert cache.folder == folders[0]
    return cache


def test_fsdp_full_fine_tune_killed_and_resumed_matches_one_process(world, tmp_path):
    config = make_config(world, tmp_path / "one", full=True, lr=1e-3, save_every=1, eval_fraction=0.2)
    T.train(config)
    two = dataclasses.replace(config, out=str(tmp_path / "two"))
    crashed = torchrun(two, script=world / "fault.py", env={"FAULT": "crash"})
    assert crashed.returncode != 0
    assert [r["step"] for r in records(two.out) if "loss" in r] == [1, 2]
    step2 = Path(two.out) / "checkpoints" / "step-2"
    assert (step2 / "sharded" / ".metadata").is_file() and not (Path(two.out) / "final").exists()
    with pytest.raises(ValueError, match="written by a run of 2 processes"):
        T.train(dataclasses.replace(two, resume=True))
    check_ran(torchrun(dataclasses.replace(two, resume=True)))
    assert_same_records(records(config.out), records(two.out))
    weights = "final/model.safetensors"
    assert_same_tensors(load_file(f"{config.out}/{weights}"), load_file(f"{two.out}/{weights}"))
    assert (Path(two.out) / "final" / "tokenizer.json").is_file()


def test_a_dead_rank_ends_the_job(world, tmp_path):
    config = make_config(world, tmp_path / "out")
    start = time.monotonic()
    result = torchrun(config, script=world / "fault.py", env={"FAULT": "die"}, timeout=120)
    assert result.returncode != 0 and time.monotonic() - start < 100
    assert "exitcode  : 3" in result.stderr  # torchrun names the rank that died


def test_a_hung_rank_times_out_with_a_clear_message(world, tmp_path):
    config = make_config(world, tmp_path / "out", dist_timeout=4.0)
    start = time.monotonic()
    result = torchrun(config, script=world / "fault.py", env={"FAULT": "hang", "HANG_S": "12"}, timeout=120)
    assert result.returncode != 0 and time.monotonic() - start < 100
    assert "rank 0 of 2): error: a collective with the other processes failed" in result.stderr
    assert "--dist-timeout 4 s" in result.stderr
