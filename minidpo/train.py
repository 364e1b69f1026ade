"""The training loop: DPO (or SFT) on preference pairs, plain, resumable and measured. The top layer
of training: imports config, batching, scoring, reference, runfolder and anything below; none import it.

    train(config)        data -> policy and reference -> optimizer steps -> checkpoints -> final/
    dpo_step / sft_step  forward and backward over one optimizer step's micro-batches
    cli(argv, command)   `python -m minidpo train|sft` (flags from minidpo.config.TrainConfig)

A batch is `minidpo.data.collate`'s `[chosen; rejected]` rows, so one forward scores both answers;
with `prefix_sharing` (DPO) `minidpo.prefix.packed_collate`'s rows `prompt + chosen + rejected`, so
each prompt is computed once (the policy pass, the reference pass and precomputed references).
A step's loss is the mean over its pairs however they are split into `grad_accum` micro-batches:
each micro-batch adds `sum(its per-pair losses) / pairs in the step`, so 4 micro-batches of 1 and one
batch of 4 give the same gradient up to rounding. SFT: the NLL per chosen-reply token of the step.

Under `torchrun` every process runs `train`: `batch_size` stays the global pairs per step, each rank
takes its share of every micro-batch, gradients are reduced once per step (DDP for LoRA, FSDP2 for
full fine-tunes, through `minidpo.scoring.BatchLogpsModule`) and metrics are summed over the ranks,
so the run equals a one-process run with the same flags; rank 0 logs and writes (see minidpo.distributed).

The reference (DPO): `adapter-off` is the LoRA model itself under `lora_disabled`, no_grad and eval
mode (so no dropout; no second copy of the weights); `copy` a frozen copy of the starting weights
(full fine-tunes); `precomputed` one no_grad pass before training, cached per pair on disk
(`minidpo.reference`, `minidpo.refcache`) and reused by every run with the same key; `auto` is
adapter-off for LoRA runs and copy for full ones. The reference-free losses (simpo, cpo, orpo) have
none: no copy, no cache, no pass.

OUT's layout: see minidpo.runfolder.
The precomputed pass covers the pairs a run uses (training and eval); each pair's values are stored
under a digest of its token ids, so runs over nested subsets compute every pair once in all.
"""
import json
import logging
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from minidpo import distributed, gguf, tracking
from minidpo.batching import (chosen_tokens, data_digest, epoch_order, make_batch, prepare_data, step_batches,
                              step_pairs, step_scored_tokens)
from minidpo.checkpoint import download_folder
from minidpo.config import TrainConfig, parse_config, reference_mode, resume_command
from minidpo.distributed import ONE, Dist, grad_sync, share
from minidpo.loss import batch_nll, dpo_loss, needs_average, nll_weight
from minidpo.reference import build_models, precomputed_reference, reference_logps, resolve_dtype
from minidpo.runfolder import (Progress, StopSignals, TrainState, append_metrics, checkpoints, load_checkpoint,
                               prepare_out, save_checkpoint, save_final, truncate_metrics)
from minidpo.scoring import BatchLogpsModule, batch_logps, unwrap
from minidpo.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(config: TrainConfig) -> dict:
    """Run the training `config` describes. -> a summary: `status` ("finished" or "interrupted"),
    `steps`, `out`, `final`, `checkpoint` (the newest), `reference_computed`, `train_pairs`, `eval_pairs`.

    SIGINT/SIGTERM: the current step finishes, a checkpoint is written, and the summary comes back
    with status "interrupted" (and `signal`). A non-finite loss or gradient norm raises
    FloatingPointError naming the step; the newest checkpoint is the last good state.
    Under torchrun every process runs this (see minidpo.distributed): each takes its share of every
    global batch, rank 0 logs and writes, and the results equal a one-process run's.
    With `dry_run` nothing is loaded or written: the memory plan is printed and returned (`plan`).
    """
    if config.dry_run:
        from minidpo.memory import plan_for

        plan = plan_for(config)
        print(plan.table())
        return {"status": "dry-run", "plan": plan, "out": config.out}
    d = distributed.init(config.device, config.dist_timeout)
    try:
        return _train(config, d)
    finally:
        distributed.close(d)


def fetch_model(name: str, d: Dist) -> Path:
    """`download_folder` on rank 0 first; the other ranks then find it in the hub cache. A `.gguf`
    file is used where it is."""
    if gguf.is_gguf(name):
        if not Path(name).expanduser().is_file():
            raise FileNotFoundError(f"--model {name}: no such GGUF file")
        return Path(name).expanduser()
    if not d.main:
        d.barrier()
    folder = download_folder(name)
    if d.main:
        d.barrier()
    return folder


def _train(config: TrainConfig, d: Dist) -> dict:
    if config.prefix_sharing and config.prefix_attention == "flex" and d.device.type != "cuda":
        raise ValueError("--prefix-attention flex needs CUDA (FlexAttention has no backward on CPU); "
                         "use sdpa")
    if config.micro_batch_size % d.world:
        raise ValueError(f"--batch-size {config.batch_size} / --grad-accum {config.grad_accum} = "
                         f"{config.micro_batch_size} pairs per micro-batch cannot be shared by {d.world} "
                         f"processes: make it a multiple of {d.world}")
    out = prepare_out(config, write=d.main)
    d.barrier()
    device, dtype = d.device, resolve_dtype(config, d.device)
    seed_everything(config.seed)
    folder = fetch_model(config.model, d)
    tokenizer = load_tokenizer(folder, template=config.template or None)
    train_pairs, eval_pairs = prepare_data(config, tokenizer)
    model, reference = build_models(config, folder, device, dtype)
    if d.world > 1:
        model = distributed.wrap(BatchLogpsModule(model), d, full=config.full)
        if reference is not None and config.full:  # as big as the policy: shard it too
            reference = distributed.shard(BatchLogpsModule(reference))
        seed_everything(config.seed + 7919 * d.rank)  # each rank its own dropout masks
    ref_train = ref_eval = None
    computed = 0
    if reference_mode(config) == "precomputed":
        table, computed = precomputed_reference(config, folder, tokenizer, model, train_pairs + eval_pairs,
                                                device, dtype, d)
        ref_train, ref_eval = table[:len(train_pairs)], table[len(train_pairs):]
    steps_per_epoch = math.ceil(len(train_pairs) / config.batch_size)
    total = config.max_steps or config.epochs * steps_per_epoch
    optimizer, scheduler = build_optimizer(unwrap(model), config, total)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = TrainState(data_digest=data_digest(train_pairs), world_size=d.world)
    found = checkpoints(out) if config.resume else []
    if found:
        state = load_checkpoint(found[-1], model, optimizer, scheduler, state.data_digest, d)
    metrics_file = out / "metrics.jsonl"
    if d.main:
        truncate_metrics(metrics_file, state.step)
    trackers = tracking.open_trackers(config, out, state.step) if d.main else tracking.Trackers()
    last_checkpoint = found[-1] if found else None
    step_fn = dpo_step if config.mode == "dpo" else sft_step
    summary = {"status": "finished", "out": str(out), "reference_computed": computed,
               "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs)}
    progress = Progress(total, state.step, config.log_every, show=d.main)
    with StopSignals() as stop, trackers:
        while state.step < total:
            epoch, position = divmod(state.step, steps_per_epoch)
            if state.order_epoch != epoch:
                state.order_epoch, state.order = epoch, epoch_order(train_pairs, config, epoch)
            indices = state.order[position]
            start = time.perf_counter()
            micro_batches = step_batches(train_pairs, indices, config, tokenizer.pad_id, device, ref_train, d)
            metrics = step_fn(model, micro_batches, config, reference, d)
            extra = {"tokens": sum(b["tokens"] * b["real"] for b in micro_batches),
                     "stop": float(stop.received is not None)}
            try:
                values = optimizer_step(params, optimizer, scheduler, metrics, config, state.step + 1, d, extra)
            except FloatingPointError as e:
                progress.close()
                raise FloatingPointError(f"{e}. Stopped; the last good checkpoint is "
                                         f"{last_checkpoint or 'none (no checkpoint was written)'}") from e
            step_tokens, stopped = round(values.pop("tokens")), values.pop("stop") > 0
            state.step, state.examples = state.step + 1, state.examples + len(indices)
            state.tokens += step_tokens
            record = step_record(state, values, steps_per_epoch, time.perf_counter() - start)
            if d.main:
                append_metrics(metrics_file, record)
                trackers.log(record)
            progress.update(record, step_tokens)
            if eval_pairs and (state.step == total or (config.eval_every and state.step % config.eval_every == 0)):
                results = evaluate(model, reference, eval_pairs, config, tokenizer.pad_id, device, ref_eval, d)
                if d.main:
                    append_metrics(metrics_file, {"step": state.step, **results})
                    trackers.log({"step": state.step, **results})
                logger.info("eval at step %d: %s", state.step, json.dumps(results))
            if stopped or (config.save_every and state.step % config.save_every == 0):
                last_checkpoint = save_checkpoint(out, model, optimizer, scheduler, state,
                                                  config.keep_checkpoints, d)
            if stopped and state.step < total:
                progress.close()
                signum = stop.received or signal.SIGTERM  # another rank may have received it
                logger.warning("stopped by %s after step %d; checkpoint %s. Resume with:\n  %s",
                               signal.Signals(signum).name, state.step, last_checkpoint,
                               resume_command(config))
                return {**summary, "status": "interrupted", "signal": signum, "steps": state.step,
                        "checkpoint": str(last_checkpoint), "final": None}
    progress.close()
    final = save_final(out, model, config, folder, d)
    logger.info("done: %d steps, %s", state.step, final)
    return {**summary, "steps": state.step, "final": str(final),
            "checkpoint": str(last_checkpoint) if last_checkpoint else None}


def step_record(state: TrainState, values: dict, steps_per_epoch: int, seconds: float) -> dict:
    """The metrics.jsonl record of the step just done."""
    record = {"step": state.step, "epoch": state.step / steps_per_epoch, "examples": state.examples,
              "tokens": state.tokens, **values}
    if "rewards/chosen" in values:
        record["rewards/margin"] = values["rewards/chosen"] - values["rewards/rejected"]
    record["step_time_s"] = seconds
    return record


DPO_SUMS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/chosen", "logps/rejected")


def dpo_forward(model, reference, batch: dict, config: TrainConfig, nll_scale: Optional[dict] = None):
    """-> (DPOOutput of the micro-batch's b pairs, policy log-probs [2b]). Grad flows iff enabled.

    Reference-free losses run no reference pass. Where the loss adds the chosen replies' NLL,
    `nll_scale` (`pairs`, `tokens`: the step's or eval set's totals) makes it their mean NLL per token
    (TRL's); None: this micro-batch's."""
    average = needs_average(config.loss)
    ref = batch.get("ref_logps")
    if ref is None and reference_mode(config) is not None:
        ref = reference_logps(model, reference, batch, average=average)
    logps = batch_logps(model, batch, average=average)
    b = logps.shape[0] // 2
    nll = None
    if nll_weight(config.loss, cpo_alpha=config.cpo_alpha, rpo_alpha=config.rpo_alpha):
        nll = batch_nll(logps[:b], chosen_tokens(batch), average=average, **(nll_scale or {}))
    out = dpo_loss(logps[:b], logps[b:], None if ref is None else ref[:b], None if ref is None else ref[b:],
                   beta=config.beta, loss_type=config.loss, label_smoothing=config.label_smoothing,
                   simpo_gamma=config.simpo_gamma, cpo_alpha=config.cpo_alpha, rpo_alpha=config.rpo_alpha,
                   chosen_nll=nll)
    return out, logps


def dpo_sums(out, logps: torch.Tensor) -> dict:
    """0-d sums over the micro-batch's pairs (no host sync): `DPO_SUMS`, then the loss's own metrics
    (`out.metrics`: `nll_loss`; orpo `log_odds_ratio`, `log_odds_chosen`)."""
    b = logps.shape[0] // 2
    logps = logps.detach()
    values = [out.losses.detach().sum(), out.chosen_rewards.sum(), out.rejected_rewards.sum(),
              (out.chosen_rewards > out.rejected_rewards).float().sum(), logps[:b].sum(), logps[b:].sum()]
    return {**dict(zip(DPO_SUMS, values)), **{k: v.sum() for k, v in out.metrics.items()}}


def add_sums(total: dict, sums: dict, real: float) -> dict:
    """`total` plus `sums`, which count only for a real (not stand-in) share: `real` is 1.0 or 0.0."""
    return {k: total.get(k, 0) + v * real for k, v in sums.items()}


def dpo_step(model, micro_batches: list[dict], config: TrainConfig, reference=None, d: Dist = ONE) -> dict:
    """Forward and backward over one optimizer step's micro-batches; gradients add up in `.grad`.

    Each micro-batch's loss is `sum(per-pair losses) / pairs in the step` (pairs of every rank), so
    the accumulated gradient is that of the step's mean loss; with several ranks it is multiplied by
    their number, which DDP and FSDP2 divide by when they average. An NLL term is the NLL per chosen
    token of the whole step. Gradients are reduced on the last micro-batch only. Returns this rank's
    share of the step's means (`dpo_sums` keys; summed over the ranks by `optimizer_step`) as 0-d
    tensors on the model's device: nothing is synced to the host.
    """
    n_pairs = step_pairs(micro_batches, d)
    scale = None
    if nll_weight(config.loss, cpo_alpha=config.cpo_alpha, rpo_alpha=config.rpo_alpha):
        tokens = sum(chosen_tokens(b).sum() * b.get("real", 1.0) for b in micro_batches)
        scale = {"pairs": n_pairs, "tokens": d.all_sum(tokens)}
    sums = {}
    for i, batch in enumerate(micro_batches):
        real = batch.get("real", 1.0)
        with grad_sync(model, last=i == len(micro_batches) - 1):
            out, logps = dpo_forward(model, reference, batch, config, scale)
            (out.losses.sum() * (real * d.world) / n_pairs).backward()
        sums = add_sums(sums, dpo_sums(out, logps), real)
    return {k: v / n_pairs for k, v in sums.items()}


def sft_step(model, micro_batches: list[dict], config: TrainConfig, reference=None, d: Dist = ONE) -> dict:
    """Forward and backward of one SFT step on chosen rows: the NLL per reply token of the step
    (tokens of every rank; gradients scaled and reduced as in `dpo_step`)."""
    n_tokens = step_scored_tokens(micro_batches, d)
    total = 0
    for i, batch in enumerate(micro_batches):
        with grad_sync(model, last=i == len(micro_batches) - 1):
            loss = -batch_logps(model, batch).sum() * batch.get("real", 1.0) / n_tokens
            (loss * d.world).backward()
        total = total + loss.detach()
    return {"loss": total}


def optimizer_step(params: list, optimizer, scheduler, metrics: dict, config: TrainConfig, step: int,
                   d: Dist = ONE, extra: Optional[dict] = None) -> dict:
    """Clip, sum the step's metrics (and the numbers in `extra`) over the ranks, sync them to the host
    once, refuse non-finite values, update.

    -> the metrics and `extra` as floats plus `grad_norm` (before clipping) and `lr` (the one just
    used). Raises FloatingPointError naming `step` before the weights are touched.
    """
    norm = distributed.local_norm(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf))
    extra = extra or {}
    local = torch.cat([torch.stack([v.double() for v in metrics.values()]),
                       torch.tensor(list(extra.values()), dtype=torch.float64, device=norm.device)])
    summed = torch.cat([d.all_sum(local), norm.double().reshape(1)]).tolist()
    values = dict(zip([*metrics, *extra, "grad_norm"], summed))
    if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"step {step}: loss {values['loss']}, grad_norm {values['grad_norm']} "
                                 f"is not finite; the weights were not updated by it")
    values["lr"] = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return values


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at 0-based step `step`: linear warmup reaching 1 at step
    `warmup - 1`, then cosine or linear decay towards 0 at step `total`, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


def build_optimizer(model: nn.Module, config: TrainConfig, total_steps: int):
    """AdamW over the trainable parameters and its LambdaLR schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:  # the fused kernel: one pass over each parameter, no foreach temporaries (7x faster on CPU)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except RuntimeError:  # a device or dtype it does not support
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = math.ceil(config.warmup_ratio * total_steps)

    def factor(step):
        return lr_factor(step, total=total_steps, warmup=warmup, schedule=config.schedule)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model, reference, pairs: list, config: TrainConfig, pad_id: int, device, ref_table=None,
             d: Dist = ONE) -> dict:
    """Means over held-out pairs in eval mode: DPO `eval/loss`, `eval/rewards/...`, `eval/logps/...`;
    SFT `eval/loss` (NLL per chosen-reply token). Plus `eval/examples`. Ranks split the pairs."""
    was_training = model.training
    model.eval()
    try:
        sums = {}
        scale = {"pairs": len(pairs), "tokens": sum(len(p.chosen_ids) for p in pairs)}  # the NLL per eval token
        for s in range(0, len(pairs), config.micro_batch_size):
            idx, real = share(list(range(s, min(len(pairs), s + config.micro_batch_size))), d)
            batch = make_batch(pairs, idx, pad_id, device, ref_table=ref_table, chosen_only=config.mode == "sft",
                               packed=config.prefix_sharing, attention=config.prefix_attention)
            if config.mode == "sft":
                nll = -batch_logps(model, batch).sum().double()
                sums = add_sums(sums, {"nll": nll, "scored": nll.new_tensor(float(batch["scored"]))}, real)
            else:
                sums = add_sums(sums, dpo_sums(*dpo_forward(model, reference, batch, config, scale)), real)
    finally:
        model.train(was_training)
    sums = dict(zip(sums, d.all_sum(torch.stack([v.double() for v in sums.values()])).tolist()))
    if config.mode == "sft":
        return {"eval/loss": sums["nll"] / sums["scored"], "eval/examples": len(pairs)}
    values = {k: v / len(pairs) for k, v in sums.items()}
    values["rewards/margin"] = values["rewards/chosen"] - values["rewards/rejected"]
    return {**{f"eval/{k}": v for k, v in values.items()}, "eval/examples": len(pairs)}


def cli(argv=None, command: str = "train") -> int:
    """`python -m minidpo train|sft ...`: 0 when done, 1 on an error, 128 + signal when stopped."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not logging.getLogger().handlers:  # under torchrun only rank 0 logs progress
        logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_config(argv, command)
    where = f" (rank {rank} of {world})" if world > 1 else ""
    try:
        summary = train(config)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"minidpo {command}{where}: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not is_collective_failure(e, world):
            raise
        print(f"minidpo {command}{where}: error: a collective with the other processes failed: another "
              f"process died or hung (collectives wait --dist-timeout {config.dist_timeout:g} s): {e}",
              file=sys.stderr)
        return 1
    if summary["status"] == "dry-run":
        return 0
    return 0 if summary["status"] == "finished" else 128 + summary["signal"]


def is_collective_failure(error: RuntimeError, world: int) -> bool:
    """A peer died or a collective outwaited its timeout (gloo raises plain RuntimeErrors for both)."""
    text = str(error)
    return world > 1 and (isinstance(error, torch.distributed.DistError) or "gloo" in text
                          or "NCCL" in text or "Timed out" in text or "Connection closed" in text)
