"""The training loop: DPO (or SFT) on preference pairs, plain, resumable and measured.

    TrainConfig          every setting, one field each; `python -m minidpo train|sft` builds its flags
                         from the fields (names with dashes, help from the field's comment)
    train(config)        data -> policy and reference -> optimizer steps -> checkpoints -> final/
    dpo_step / sft_step  forward and backward over one optimizer step's micro-batches

A batch is `minidpo.data.collate`'s `[chosen; rejected]` rows, so one forward scores both answers;
with `prefix_sharing` (DPO) `minidpo.prefix.packed_collate`'s rows `prompt + chosen + rejected`, so
each prompt is computed once (the policy pass, the reference pass and precomputed references).
A step's loss is the mean over its pairs however they are split into `grad_accum` micro-batches:
each micro-batch adds `sum(its per-pair losses) / pairs in the step`, so 4 micro-batches of 1 and one
batch of 4 give the same gradient up to rounding. SFT: the NLL per chosen-reply token of the step.

Under `torchrun` every process runs `train`: `batch_size` stays the global pairs per step, each rank
takes its share of every micro-batch, gradients are reduced once per step (DDP for LoRA, FSDP2 for
full fine-tunes, through `Scorer`) and metrics are summed over the ranks, so the run equals a
one-process run with the same flags; rank 0 logs and writes (see minidpo.distributed).

The reference (DPO): `adapter-off` is the LoRA model itself under `lora_disabled`, no_grad and eval
mode (so no dropout; no second copy of the weights); `copy` a frozen copy of the starting weights
(full fine-tunes); `precomputed` one no_grad pass before training, cached per pair on disk
(`minidpo.refcache`) and reused by every run with the same key; `auto` is adapter-off for LoRA runs
and copy for full ones. The reference-free losses (simpo, cpo, orpo) have none: no copy, no cache, no pass.

OUT holds `config.json`; `metrics.jsonl` (one record per optimizer step: `step`, `epoch` (steps
over steps per epoch), `examples` and `tokens` (pairs and non-pad tokens the policy processed so
far), `loss`, `rewards/{chosen,rejected,accuracy,margin}`, `logps/{chosen,rejected}` (means over
the step's pairs), `lr`, `grad_norm` (before clipping), `step_time_s`, plus the loss's own under TRL's
names: `nll_loss` where the loss adds the chosen NLL, orpo's `log_odds_ratio` and `log_odds_chosen`;
SFT records have no rewards or logps; eval records carry `step` and `eval/...` keys); `checkpoints/step-N/`
(`trainable.safetensors`; `training_state.pt`: optimizer, scheduler and every RNG state;
`state.json`: counters, the epoch's data order and the position), written to `step-N.tmp` and
renamed; `final/` (a PEFT adapter, or a Hugging Face model folder with the tokenizer files).
The precomputed pass covers the pairs a run uses (training and eval); each pair's values are stored
under a digest of its token ids, so runs over nested subsets compute every pair once in all.
"""
import argparse
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minidpo import distributed, gguf, tracking
from minidpo.checkpoint import download_folder, load_model, save_model
from minidpo.data import IGNORE_INDEX, batches, collate, load_pairs, subset, tokenize_pairs
from minidpo.distributed import Dist, grad_sync, share
from minidpo.logprobs import sequence_logprobs, sequence_logprobs_from_hidden
from minidpo.lora import DEFAULT_TARGETS, apply_lora, lora_disabled, lora_layers, save_lora
from minidpo.loss import LOSS_TYPES, batch_nll, dpo_loss, needs_average, needs_reference, nll_weight
from minidpo.prefix import is_packed, packed_collate, packed_logps
from minidpo.quant import is_quantized
from minidpo.refcache import ReferenceCache, default_root, pair_digest, tokenizer_digest, weights_digest
from minidpo.tokenizer import TOKENIZER_FILES, TEMPLATES, load_tokenizer

logger = logging.getLogger(__name__)

MODES = ("dpo", "sft")
SCHEDULES = ("cosine", "linear", "constant")
REFERENCES = ("auto", "adapter-off", "copy", "precomputed")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CHOICES = {"mode": MODES, "loss": LOSS_TYPES, "schedule": SCHEDULES, "reference": REFERENCES,
           "dtype": DTYPES, "template": ("",) + tuple(TEMPLATES), "prefix_attention": ("sdpa", "flex"),
           "quantize": ("", "nf4")}
# Fields a resumed run may change: they do not change what is computed.
RESUMABLE_CHANGES = ("resume", "save_every", "keep_checkpoints", "log_every", "eval_every", "device",
                     "dist_timeout", "report_to", "dry_run", "device_memory")
REF_FLUSH_PAIRS = 4096  # precomputed references are written to the cache this many pairs at a time
ONE = Dist()  # a one-process run


# ---------------------------------------------------------------------------------------------------
# The configuration.

@dataclass
class TrainConfig:
    """One training run. Fields become `--flags`; the comment after a field is its help."""

    model: str  # Hugging Face model folder, hub repo id or .gguf file: the starting policy and the reference
    data: list[str]  # preference data sources LOCATION[::FORMAT] (see minidpo.data); several pool
    out: str  # output folder: config.json, metrics.jsonl, checkpoints/, final/
    mode: str = "dpo"  # dpo (preference loss) or sft (NLL of the chosen reply); set by the command
    lora_r: int = 16  # LoRA rank
    lora_alpha: float = 32.0  # LoRA scale numerator: scale = alpha / r
    lora_dropout: float = 0.05  # dropout on the adapters' input (policy only: the reference has none)
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # modules given adapters
    full: bool = False  # full fine-tune (every weight trains) instead of LoRA
    quantize: str = ""  # nf4: keep the frozen base's Linear weights in 4-bit NF4 (QLoRA; LoRA only)
    beta: float = 0.1  # DPO temperature beta (orpo: the odds-ratio weight lambda; simpo, cpo: the reward scale)
    loss: str = "sigmoid"  # preference loss, TRL's names (see minidpo.loss); simpo, cpo, orpo use no reference
    label_smoothing: float = 0.0  # assumed share of flipped labels (sigmoid: cDPO, robust, exo_pair, aot, simpo, cpo)
    rpo_alpha: float = 0.0  # weight of the chosen replies' NLL per token added to a loss with a reference (RPO)
    simpo_gamma: float = 0.5  # SimPO's target reward margin gamma (simpo only)
    cpo_alpha: float = None  # weight of the chosen NLL per token in cpo, simpo (unset: 1 for cpo, 0 for simpo)
    lr: float = 5e-5  # peak learning rate of AdamW
    schedule: str = "cosine"  # learning rate after the warmup
    warmup_ratio: float = 0.1  # share of the steps spent warming the learning rate up linearly
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # clip the gradient norm to this (0: no clipping; the norm is logged)
    batch_size: int = 8  # pairs per optimizer step (global)
    grad_accum: int = 1  # micro-batches per optimizer step; must divide batch_size
    max_steps: int = 0  # optimizer steps to run (0: `epochs` passes over the training pairs)
    epochs: int = 1  # passes over the training pairs when max_steps is 0
    max_length: int = 1024  # tokens per row (prompt + reply); longer replies are cut
    max_prompt_length: int = 0  # prompt tokens kept (its end); 0: half of max_length
    fraction: float = 1.0  # share of the non-eval pairs to train on (nested subsets for one seed)
    eval_fraction: float = 0.0  # share of the pooled pairs held out for evaluation (0: no eval)
    eval_every: int = 0  # evaluate every N steps (0: only after the last step)
    group_by_length: bool = True  # batch pairs of similar length together (less padding)
    drop_ties: bool = False  # drop ultrafeedback pairs whose ratings are equal
    seed: int = 0  # seeds the eval split, the subset, the data order, LoRA init and dropout
    save_every: int = 0  # checkpoint every N steps (0: none, except when stopped by a signal)
    keep_checkpoints: int = 2  # newest checkpoints kept
    resume: bool = False  # continue from the newest checkpoint in OUT/checkpoints
    reference: str = "auto"  # auto: adapter-off for LoRA, copy for full fine-tunes
    ref_cache_dir: str = ""  # precomputed references ("": $MINIDPO_CACHE/reference or ~/.cache/minidpo/reference)
    dtype: str = "auto"  # weight dtype (auto: bfloat16 for a LoRA base on CUDA, else float32)
    device: str = "auto"  # torch device (auto: cuda when available, else cpu)
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward (less memory)
    prefix_sharing: bool = True  # DPO: one row per pair, its prompt computed once (timings: benchmarks/RESULTS.md)
    prefix_attention: str = "sdpa"  # packed rows' attention: sdpa, or flex (FlexAttention; CUDA only, unmeasured)
    template: str = ""  # built-in chat template to use instead of the model folder's own
    log_every: int = 1  # without a terminal, log a line every N steps
    dist_timeout: float = 1800.0  # torchrun: seconds a collective waits for the other processes before the job ends
    report_to: list[str] = field(default_factory=lambda: ["none"])  # trackers fed metrics.jsonl: tensorboard, wandb, trackio (several) or none
    dry_run: bool = False  # print the planned memory per device (from --model's config.json alone) and exit
    device_memory: float = 0.0  # GiB per device the --dry-run plan must fit (0: the visible GPU's)

    def __post_init__(self):
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t for t in self.lora_targets.split(",") if t]
        self.lora_targets = [t for item in self.lora_targets for t in str(item).split(",") if t]
        self.data, self.model, self.out = [str(d) for d in self.data], str(self.model), str(self.out)
        self.report_to = tracking.check_report_to(self.report_to)
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}; choose one of {list(choices)}")
        for name in ("model", "out"):
            if not getattr(self, name):
                raise ValueError(f"TrainConfig.{name} is required")
        if not self.data:
            raise ValueError("TrainConfig.data: give at least one data source")
        self._check_numbers()
        self._check_loss()
        if self.full and self.quantize:
            raise ValueError(f"TrainConfig.quantize={self.quantize!r} needs LoRA: a full fine-tune trains the "
                             f"base weights, which a 4-bit base cannot hold; drop --full or --quantize")
        if self.full and self.reference == "adapter-off":
            raise ValueError("TrainConfig.reference='adapter-off' needs LoRA; a full fine-tune uses "
                             "'copy' or 'precomputed'")

    def _check_numbers(self):
        checks = {
            "lora_r": self.lora_r >= 1, "lora_alpha": self.lora_alpha > 0,
            "lora_dropout": 0 <= self.lora_dropout < 1, "lora_targets": bool(self.lora_targets),
            "beta": 0 < self.beta < math.inf, "label_smoothing": 0 <= self.label_smoothing < 0.5,
            "lr": 0 < self.lr < math.inf, "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "weight_decay": self.weight_decay >= 0, "max_grad_norm": self.max_grad_norm >= 0,
            "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1,
            "max_steps": self.max_steps >= 0, "epochs": self.epochs >= 1,
            "max_length": self.max_length >= 2,
            "max_prompt_length": 0 <= self.max_prompt_length < self.max_length,
            "fraction": 0 < self.fraction <= 1, "eval_fraction": 0 <= self.eval_fraction < 1,
            "eval_every": self.eval_every >= 0, "save_every": self.save_every >= 0,
            "keep_checkpoints": self.keep_checkpoints >= 1, "log_every": self.log_every >= 1,
            "dist_timeout": 0 < self.dist_timeout < math.inf, "device_memory": self.device_memory >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError("TrainConfig: out of range: " + ", ".join(
                f"{name}={getattr(self, name)!r}" for name in bad) + "; see `--help` for the ranges")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} is not a multiple of "
                             f"grad_accum={self.grad_accum}")

    def _check_loss(self):
        """The loss's options as TRL's trainers check them, plus those that mean nothing for the loss."""
        if self.cpo_alpha is None:  # the loss's own default (TRL's CPOConfig: 1; SimPO has no NLL)
            self.cpo_alpha = 1.0 if self.loss == "cpo" else 0.0
        try:
            nll_weight(self.loss, beta=self.beta, label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma,
                       cpo_alpha=self.cpo_alpha, rpo_alpha=self.rpo_alpha)
        except ValueError as e:
            raise ValueError(f"TrainConfig: {e}") from None
        if not needs_reference(self.loss) and self.reference != "auto":
            raise ValueError(f"TrainConfig.reference={self.reference!r}: loss {self.loss!r} uses no reference "
                             f"model; leave --reference at auto")

    @property
    def prompt_limit(self) -> int:
        """Prompt tokens kept: max_prompt_length, or half of max_length when it is 0."""
        return self.max_prompt_length or self.max_length // 2

    @property
    def micro_batch_size(self) -> int:
        """Pairs per forward pass."""
        return self.batch_size // self.grad_accum


def reference_mode(config: TrainConfig) -> Optional[str]:
    """The reference actually used: None for SFT and reference-free losses; `auto` resolved."""
    if config.mode == "sft" or not needs_reference(config.loss):
        return None
    if config.reference == "auto":
        return "copy" if config.full else "adapter-off"
    return config.reference


# ---------------------------------------------------------------------------------------------------
# Data: pooled pairs -> (held-out eval pairs, training subset) -> token ids -> micro-batches.

def split_eval(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    """-> (rest, eval): a seeded `fraction` of the pooled pairs held out, both in their order.

    The split comes before `subset`, so every training fraction of one seed meets the same eval set.
    """
    if fraction == 0:
        return list(pairs), []
    order = list(range(len(pairs)))
    random.Random(f"minidpo-eval-{seed}").shuffle(order)
    k = round(fraction * len(pairs))
    if not 0 < k < len(pairs):
        raise ValueError(f"eval_fraction {fraction} of {len(pairs)} pairs holds out {k}: "
                         f"need at least one eval and one training pair")
    held = set(order[:k])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def prepare_data(config: TrainConfig, tokenizer) -> tuple[list, list]:
    """-> (training TokenizedPairs, eval TokenizedPairs); each stage's report is logged."""
    pairs, _ = load_pairs(config.data, drop_ties=config.drop_ties)
    rest, held = split_eval(pairs, config.eval_fraction, config.seed)
    train_pairs, composition = subset(rest, config.fraction, config.seed)
    logger.info("data: %d pooled pairs, %d held out for eval, %d trained on (%s)", len(pairs),
                len(held), len(train_pairs), dict(composition))
    kwargs = dict(max_length=config.max_length, max_prompt_length=config.prompt_limit)
    train_tok, _ = tokenize_pairs(train_pairs, tokenizer, **kwargs)
    eval_tok = tokenize_pairs(held, tokenizer, **kwargs)[0] if held else []
    if not train_tok:
        raise ValueError(f"no training pairs are left from {config.data} after tokenization "
                         f"(max_length={config.max_length}); see the logged reports")
    return train_tok, eval_tok


def epoch_order(pairs: list, config: TrainConfig, epoch: int) -> list[list[int]]:
    """Epoch `epoch`'s batches (lists of indices into `pairs`), from the run's seed."""
    return batches(pairs, config.batch_size, seed=config.seed * 100_003 + epoch,
                   group_by_length=config.group_by_length)


def make_batch(pairs: list, indices: list[int], pad_id: int, device, *, ref_table=None,
               chosen_only: bool = False, packed: bool = False, attention: str = "sdpa") -> dict:
    """Collate `pairs[indices]` onto `device`: `input_ids`, `attention_mask`, `labels` [R, T] int64.

    R = 2b rows (chosen, then rejected), or b chosen rows cut to their own width with `chosen_only`.
    `packed`: instead b rows prompt + chosen + rejected (`minidpo.prefix.packed_collate`'s keys),
    with `attention` (the packed rows' attention, see `minidpo.prefix.packed_logps`).
    With `ref_table` (fp32 [N, 2]) the batch carries `ref_logps` [2b]. `tokens` (non-pad tokens of
    the 2b unshared rows, whatever the layout) and `scored` (reply tokens scored) are Python ints.
    """
    if packed and not chosen_only:
        return {**_packed_batch(pairs, indices, pad_id, device, ref_table), "attention": attention}
    batch = collate([pairs[i] for i in indices], pad_id)
    del batch["prompt_lengths"]
    if chosen_only:
        b = len(indices)
        width = int(batch["attention_mask"][:b].sum(1).max())
        batch = {k: v[:b, :width] for k, v in batch.items()}
    if ref_table is not None:
        ref = ref_table[torch.tensor(indices)]
        batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
    tokens = int(batch["attention_mask"].sum())
    scored = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return {**batch, "tokens": tokens, "scored": scored}


def _packed_batch(pairs: list, indices: list[int], pad_id: int, device, ref_table) -> dict:
    """make_batch's packed layout. `tokens` counts the prompt twice, as the unshared rows hold it,
    so metrics and tokens/s do not depend on the layout."""
    selected = [pairs[i] for i in indices]
    batch = packed_collate(selected, pad_id)
    if ref_table is not None:
        ref = ref_table[torch.tensor(indices)]
        batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
    tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in selected)
    scored = sum(int((batch[k] != IGNORE_INDEX).sum()) for k in ("labels_chosen", "labels_rejected"))
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return {**batch, "tokens": tokens, "scored": scored}


def pair_count(batch: dict) -> int:
    """Pairs in a DPO batch of either layout."""
    return batch["input_ids"].shape[0] // (1 if is_packed(batch) else 2)


def step_batches(pairs: list, indices: list[int], config: TrainConfig, pad_id: int, device, ref_table=None,
                 d: Dist = ONE) -> list[dict]:
    """One optimizer step's micro-batches on this rank: the global batch `indices` cut into micro-batches
    of `micro_batch_size` pairs as one process would, each shared among the ranks (`distributed.share`).
    Each carries its `weight` (0 for a stand-in pair on a rank left without one)."""
    out = []
    for i in range(0, len(indices), config.micro_batch_size):
        mine, weight = share(indices[i:i + config.micro_batch_size], d)
        batch = make_batch(pairs, mine, pad_id, device, ref_table=ref_table, chosen_only=config.mode == "sft",
                           packed=config.prefix_sharing, attention=config.prefix_attention)
        out.append({**batch, "weight": weight})
    return out


def step_total(micro_batches: list[dict], key: str, d: Dist) -> float:
    """The step's pairs (`key="pairs"`) or scored tokens (`"scored"`) over every rank's micro-batches."""
    local = sum(b.get("weight", 1.0) * (pair_count(b) if key == "pairs" else b[key]) for b in micro_batches)
    return float(d.all_sum(torch.tensor(float(local), dtype=torch.float64)))


def data_digest(pairs: list) -> str:
    """Identifies the training pairs and their order, so a resume on other data is refused."""
    h = hashlib.blake2b(digest_size=16)
    for pair in pairs:
        h.update(pair_digest(pair))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# The policy, the reference and per-sequence log-probs.

def resolve_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The weights' dtype. A frozen LoRA base on CUDA is bf16; trained weights stay fp32 (AdamW)."""
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    return torch.bfloat16 if device.type == "cuda" and not config.full else torch.float32


def build_models(config: TrainConfig, folder: Path, device, dtype) -> tuple[nn.Module, Optional[nn.Module]]:
    """-> (policy in train mode, frozen reference copy or None). LoRA adapters are fp32."""
    model = load_model(folder, dtype=dtype, device=device, quantize=config.quantize or None)
    reference = None
    if reference_mode(config) == "copy":
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    if config.full:
        model.requires_grad_(True)
    else:
        apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                   targets=config.lora_targets)
    model.gradient_checkpointing = config.gradient_checkpointing
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("model: %s, %s%s on %s, %d trainable parameters, reference %s", folder, dtype,
                " (NF4 base)" if is_quantized(model) else "", device, trainable, reference_mode(config))
    return model.train(), reference


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing elsewhere (CPU autocast is slower than fp32 there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Scorer(nn.Module):
    """The policy as DDP and FSDP2 need it: `forward(batch, average)` is `batch_logps` of the inner
    model, so every use of the weights (hidden states and the fused head) happens inside `forward`,
    the method both wrappers hook."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, average: bool = False) -> torch.Tensor:
        return batch_logps(self.model, batch, average=average)


def unwrap(model: nn.Module) -> nn.Module:
    """The Mistral inside a DDP or FSDP2 wrapped Scorer (the model itself otherwise)."""
    model = getattr(model, "module", model)  # DDP
    return model.model if isinstance(model, Scorer) else model


def batch_logps(model: nn.Module, batch: dict, *, average: bool = False) -> torch.Tensor:
    """[R] fp32: log-prob of each row's reply under `model` (summed, or per-token mean).

    With a plain head (no LoRA on `lm_head`) the [R, T, V] logits are never built: the fused head
    scores the reply tokens straight from the hidden states. Labels are unshifted (position t's
    output scores label t + 1), so both paths read shifted views in place. A packed batch (prefix
    sharing) goes to `minidpo.prefix.packed_logps`: the same [2b], chosen then rejected.
    """
    if distributed.is_wrapped(model):
        return model(batch, average=average)
    if is_packed(batch):
        return packed_logps(model, batch, average=average)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
    if type(model.lm_head) is nn.Linear:
        with autocast(ids.device):
            hidden = model.hidden_states(ids, mask)
        # The head in bf16 on CUDA, as autocast would run it (it accumulates in fp32 either way).
        dtype = torch.bfloat16 if ids.device.type == "cuda" else hidden.dtype
        weight = model.head_weight().to(dtype)
        return sequence_logprobs_from_hidden(hidden[:, :-1].to(dtype), weight, labels, average=average)
    with autocast(ids.device):
        logits = model(ids, mask)
    return sequence_logprobs(logits[:, :-1], labels, average=average)


@torch.no_grad()
def reference_logps(model: nn.Module, reference: Optional[nn.Module], batch: dict, *, average: bool):
    """[R] fp32 reference log-probs: `reference` if given, else `model` with its adapters off.

    Either runs in eval mode (no dropout) under no_grad; the policy's mode is restored after.
    """
    if reference is None and not lora_layers(model):
        raise ValueError("a full fine-tune needs a reference: --reference copy or precomputed")
    target = model if reference is None else reference
    adapters_off = lora_disabled(model) if reference is None else contextlib.nullcontext()
    was_training = target.training
    target.eval()
    try:
        with adapters_off:
            return batch_logps(target, batch, average=average)
    finally:
        target.train(was_training)


def precomputed_reference(config: TrainConfig, folder: Path, tokenizer, model, pairs: list,
                          device, dtype, d: Dist = ONE) -> tuple[torch.Tensor, int]:
    """-> (fp32 [N, 2] reference log-probs of `pairs`: chosen, rejected; how many were computed).

    Looks every pair up in the on-disk cache (see minidpo.refcache) and computes only the missing
    ones, with the starting weights (adapters off for LoRA), shortest pairs first to pad little.
    Several processes split each micro-batch, sum their parts of the table (every pair is computed
    by one rank) and rank 0 writes the cache.
    """
    average = needs_average(config.loss)
    key = {"weights": weights_digest(folder), "tokenizer": tokenizer_digest(folder, tokenizer.chat_template),
           "max_length": config.max_length, "max_prompt_length": config.max_prompt_length,
           "average": average, "dtype": str(dtype), "device": device.type}
    if is_quantized(unwrap(model)):  # a 4-bit base gives other reference log-probs
        key["quantize"] = "nf4"
    cache = ReferenceCache(config.ref_cache_dir or default_root(), key)
    # Rank 0's cache decides what every rank computes (node-local caches may differ).
    table, missing = d.from_main(cache.lookup(pairs) if d.main else None)
    logger.info("reference: %d of %d pairs cached in %s, %d to compute", len(pairs) - len(missing),
                len(pairs), cache.folder, len(missing))
    frozen = None if lora_layers(unwrap(model)) else model
    order = sorted(missing, key=lambda i: pairs[i].length)
    micro = config.micro_batch_size
    for start in range(0, len(order), REF_FLUSH_PAIRS):
        chunk = order[start:start + REF_FLUSH_PAIRS]
        values = torch.zeros(len(chunk), 2)
        for s in range(0, len(chunk), micro):
            mine, weight = share(list(range(s, min(s + micro, len(chunk)))), d)
            batch = make_batch(pairs, [chunk[j] for j in mine], tokenizer.pad_id, device,
                               packed=config.prefix_sharing, attention=config.prefix_attention)
            logps = reference_logps(model, frozen, batch, average=average).float().cpu()
            if weight:
                values[mine] = torch.stack([logps[:len(mine)], logps[len(mine):]], dim=1)
        values = d.all_sum(values)
        table[torch.tensor(chunk)] = values
        if d.main:
            cache.store([pairs[i] for i in chunk], values)
    return table, len(missing)


# ---------------------------------------------------------------------------------------------------
# One optimizer step.

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


def chosen_tokens(batch: dict) -> torch.Tensor:
    """[b] int64 on the batch's device: scored tokens of each chosen reply (for the NLL per token)."""
    labels = batch["labels_chosen"] if is_packed(batch) else batch["labels"][:pair_count(batch), 1:]
    return (labels != IGNORE_INDEX).sum(-1)


def dpo_sums(out, logps: torch.Tensor) -> dict:
    """0-d sums over the micro-batch's pairs (no host sync): `DPO_SUMS`, then the loss's own metrics
    (`out.metrics`: `nll_loss`; orpo `log_odds_ratio`, `log_odds_chosen`)."""
    b = logps.shape[0] // 2
    logps = logps.detach()
    values = [out.losses.detach().sum(), out.chosen_rewards.sum(), out.rejected_rewards.sum(),
              (out.chosen_rewards > out.rejected_rewards).float().sum(), logps[:b].sum(), logps[b:].sum()]
    return {**dict(zip(DPO_SUMS, values)), **{k: v.sum() for k, v in out.metrics.items()}}


def add_sums(total: dict, sums: dict, weight: float) -> dict:
    return {k: total.get(k, 0) + v * weight for k, v in sums.items()}


def dpo_step(model, micro_batches: list[dict], config: TrainConfig, reference=None, d: Dist = ONE) -> dict:
    """Forward and backward over one optimizer step's micro-batches; gradients add up in `.grad`.

    Each micro-batch's loss is `sum(per-pair losses) / pairs in the step` (pairs of every rank), so
    the accumulated gradient is that of the step's mean loss; with several ranks it is multiplied by
    their number, which DDP and FSDP2 divide by when they average. An NLL term is the NLL per chosen
    token of the whole step. Gradients are reduced on the last micro-batch only. Returns this rank's
    share of the step's means (`dpo_sums` keys; summed over the ranks by `optimizer_step`) as 0-d
    tensors on the model's device: nothing is synced to the host.
    """
    n_pairs = step_total(micro_batches, "pairs", d)
    scale = None
    if nll_weight(config.loss, cpo_alpha=config.cpo_alpha, rpo_alpha=config.rpo_alpha):
        tokens = sum(chosen_tokens(b).sum() * b.get("weight", 1.0) for b in micro_batches)
        scale = {"pairs": n_pairs, "tokens": d.all_sum(tokens)}
    sums = {}
    for i, batch in enumerate(micro_batches):
        weight = batch.get("weight", 1.0)
        with grad_sync(model, last=i == len(micro_batches) - 1):
            out, logps = dpo_forward(model, reference, batch, config, scale)
            (out.losses.sum() * (weight * d.world) / n_pairs).backward()
        sums = add_sums(sums, dpo_sums(out, logps), weight)
    return {k: v / n_pairs for k, v in sums.items()}


def sft_step(model, micro_batches: list[dict], config: TrainConfig, reference=None, d: Dist = ONE) -> dict:
    """Forward and backward of one SFT step on chosen rows: the NLL per reply token of the step
    (tokens of every rank; gradients scaled and reduced as in `dpo_step`)."""
    n_tokens = step_total(micro_batches, "scored", d)
    total = 0
    for i, batch in enumerate(micro_batches):
        with grad_sync(model, last=i == len(micro_batches) - 1):
            loss = -batch_logps(model, batch).sum() * batch.get("weight", 1.0) / n_tokens
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


# ---------------------------------------------------------------------------------------------------
# Evaluation.

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
            idx, weight = share(list(range(s, min(len(pairs), s + config.micro_batch_size))), d)
            batch = make_batch(pairs, idx, pad_id, device, ref_table=ref_table, chosen_only=config.mode == "sft",
                               packed=config.prefix_sharing, attention=config.prefix_attention)
            if config.mode == "sft":
                nll = -batch_logps(model, batch).sum().double()
                sums = add_sums(sums, {"nll": nll, "scored": nll.new_tensor(float(batch["scored"]))}, weight)
            else:
                sums = add_sums(sums, dpo_sums(*dpo_forward(model, reference, batch, config, scale)), weight)
    finally:
        model.train(was_training)
    sums = dict(zip(sums, d.all_sum(torch.stack([v.double() for v in sums.values()])).tolist()))
    if config.mode == "sft":
        return {"eval/loss": sums["nll"] / sums["scored"], "eval/examples": len(pairs)}
    values = {k: v / len(pairs) for k, v in sums.items()}
    values["rewards/margin"] = values["rewards/chosen"] - values["rewards/rejected"]
    return {**{f"eval/{k}": v for k, v in values.items()}, "eval/examples": len(pairs)}


# ---------------------------------------------------------------------------------------------------
# Checkpoints.

@dataclass
class TrainState:
    """Where a run is; a checkpoint's `state.json`."""

    step: int = 0  # optimizer steps done
    examples: int = 0  # pairs trained on so far
    tokens: int = 0  # non-pad tokens the policy processed so far
    order_epoch: int = -1  # the epoch `order` belongs to
    order: list = field(default_factory=list)  # that epoch's batches, lists of indices into the pairs
    data_digest: str = ""  # the training pairs the indices refer to
    world_size: int = 1  # processes of the run (a resume must use as many)


def rng_state() -> dict:
    """Every RNG a step may draw from: Python, NumPy, torch CPU and CUDA."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, model, optimizer, scheduler, state: TrainState, keep: int, d: Dist = ONE) -> Path:
    """Write OUT/checkpoints/step-N/ through a temporary folder and a rename; keep the newest `keep`.

    Rank 0 writes the trainable weights (`trainable.safetensors`), the optimizer, scheduler and every
    rank's RNG states (`training_state.pt`) and `state.json`; under FSDP2 every rank writes its shards
    of the weights and optimizer states into `sharded/` (torch.distributed.checkpoint) instead.
    """
    root = out / "checkpoints"
    final = root / f"step-{state.step}"
    tmp = root / f"step-{state.step}.tmp"
    sharded = distributed.is_sharded(model)
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    if sharded:
        distributed.save_sharded(tmp / "sharded", model, optimizer)
    rngs = d.gather_objects(rng_state())
    if d.main:
        if not sharded:
            trainable = {n: p.detach().cpu().contiguous() for n, p in unwrap(model).named_parameters()
                         if p.requires_grad}
            save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": None if sharded else optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rngs}, tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps(dataclasses.asdict(state)) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` folder is an interrupted write, never read)."""
    found = [p for p in (out / "checkpoints").glob("step-*") if re.fullmatch(r"step-\d+", p.name)
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path: Path, model, optimizer, scheduler, digest: str, d: Dist = ONE) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG states from `path`; -> its TrainState."""
    state = TrainState(**json.loads((path / "state.json").read_text()))
    if state.data_digest != digest:
        raise ValueError(f"{path} was written for other training data (or another --fraction, "
                         f"--seed, --max-length...); resume with the run's own settings")
    if state.world_size != d.world:
        raise ValueError(f"{path} was written by a run of {state.world_size} processes; resume it with "
                         f"as many (torchrun --nproc_per_node ...), not {d.world}")
    saved = torch.load(path / "training_state.pt", weights_only=True, map_location="cpu")
    if distributed.is_sharded(model):
        distributed.load_sharded(path / "sharded", model, optimizer)
    else:
        load_trainable(path / "trainable.safetensors", unwrap(model))
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rngs = saved["rng"]  # one state per rank (a single dict in checkpoints of older versions)
    set_rng_state(rngs[d.rank] if isinstance(rngs, list) else rngs)
    logger.info("resumed from %s (step %d)", path, state.step)
    return state


def load_trainable(file: Path, model) -> None:
    """Copy a checkpoint's `trainable.safetensors` into the model's trainable parameters."""
    params = dict(model.named_parameters())
    weights = load_file(str(file))
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        raise ValueError(f"{file} holds {sorted(set(weights) ^ expected)[:4]} "
                         f"that do not match the model's trainable parameters")
    with torch.no_grad():
        for name, t in weights.items():
            params[name].copy_(t)


def save_final(out: Path, model, config: TrainConfig, folder: Path, d: Dist = ONE) -> Path:
    """OUT/final/: a PEFT adapter for LoRA runs, an HF model folder (with the tokenizer) for full ones.
    Written by rank 0; under FSDP2 the shards are gathered to it first."""
    tmp, final = out / "final.tmp", out / "final"
    gathered = None
    if distributed.is_sharded(model):  # Scorer's keys start with "model."
        gathered = {k.removeprefix("model."): v for k, v in distributed.full_state_dict(model).items()}
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        net = unwrap(model)
        if lora_layers(net):
            save_lora(net, tmp, base_model_name_or_path=config.model)
        else:
            save_model(net, tmp, state_dict=gathered)
            if gguf.is_gguf(folder):  # the tokenizer lives in the file: write it out as HF files
                load_tokenizer(folder).save(tmp)
            for name in TOKENIZER_FILES:
                if (folder / name).is_file():
                    shutil.copy(folder / name, tmp / name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    d.barrier()
    return final


# ---------------------------------------------------------------------------------------------------
# The output folder, progress and signals.

def prepare_out(config: TrainConfig, write: bool = True) -> Path:
    """Create OUT and write config.json (only when `write`: rank 0); a resumed run must keep the
    settings that change results (every rank checks, so all of them refuse together)."""
    out = Path(config.out)
    file = out / "config.json"
    if config.resume and file.is_file():
        before = json.loads(file.read_text())
        now = dataclasses.asdict(config)
        changed = [k for k in now if k not in RESUMABLE_CHANGES and before.get(k) != now[k]]
        if changed:
            diff = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ValueError(f"{file} records other settings ({diff}); resume with the run's own settings "
                             f"or use a new --out")
    elif not config.resume and ((out / "metrics.jsonl").exists() or (out / "checkpoints").exists()):
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    if not write:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    os.replace(tmp, file)
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past `step` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line)["step"] <= step]
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class Progress:
    """A tqdm bar (loss, reward accuracy, tokens/s) on a terminal; log lines every N steps otherwise."""

    def __init__(self, total: int, done: int, log_every: int, show: bool = True):
        self.total, self.log_every, self.show = total, log_every, show
        self.bar = None
        if show and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)

    def update(self, record: dict, step_tokens: int):
        shown = {"loss": f"{record['loss']:.4f}", "tok/s": f"{step_tokens / record['step_time_s']:.0f}"}
        if "rewards/accuracy" in record:
            shown["acc"] = f"{record['rewards/accuracy']:.2f}"
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        elif self.show and (record["step"] % self.log_every == 0 or record["step"] == self.total):
            logger.info("step %d/%d %s lr %.3g", record["step"], self.total,
                        " ".join(f"{k} {v}" for k, v in shown.items()), record["lr"])

    def close(self):
        if self.bar is not None:
            self.bar.close()


class StopSignals:
    """Within the block, SIGINT/SIGTERM set `self.received` (the loop finishes its step, checkpoints
    and returns); a second signal raises KeyboardInterrupt at once. Off the main thread: no-op."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("%s received: finishing this step, then checkpointing (send it again to abort)",
                       signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------
# The loop.

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
        model = distributed.wrap(Scorer(model), d, full=config.full)
        if reference is not None and config.full:  # as big as the policy: shard it too
            reference = distributed.shard(Scorer(reference))
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
            extra = {"tokens": sum(b["tokens"] * b["weight"] for b in micro_batches),
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


# ---------------------------------------------------------------------------------------------------
# The command line, built from TrainConfig's fields.

CLI_HIDDEN = ("mode",)  # set by the command (train or sft), not by a flag


def field_help() -> dict:
    """Field name -> the comment after it in TrainConfig's source (the flag's help)."""
    try:
        source = inspect.getsource(TrainConfig)
    except (OSError, TypeError):  # no source (frozen install): flags without help
        return {}
    found = re.findall(r"^    (\w+): [^\n#]*#\s*(.+)$", source, flags=re.MULTILINE)
    return dict(found)


def build_parser(command: str = "train") -> argparse.ArgumentParser:
    """argparse flags from TrainConfig's fields: `--lora-r`, bools as `--x/--no-x`, lists as `--x a b`."""
    what = "DPO on preference pairs" if command == "train" else "SFT on the chosen replies of preference pairs"
    parser = argparse.ArgumentParser(prog=f"python -m minidpo {command}", description=f"minidpo: {what}.")
    helps = field_help()
    for f in dataclasses.fields(TrainConfig):
        if f.name in CLI_HIDDEN:
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default_factory() if f.default is dataclasses.MISSING else f.default)
        text = helps.get(f.name, "") + ("" if required else f" (default: {default!r})")
        text = text.replace("%", "%%")  # argparse formats help strings with %
        kwargs = {"dest": f.name, "help": text}
        if f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.type == list[str]:
            kwargs.update(nargs="+", type=str)
        else:
            kwargs["type"] = f.type
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS  # TrainConfig's default applies: one source of truth
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    return parser


def parse_config(argv=None, command: str = "train") -> TrainConfig:
    """Command-line arguments -> TrainConfig (mode from the command); bad values exit with usage."""
    if command not in ("train", "sft"):
        raise ValueError(f"command must be 'train' or 'sft', got {command!r}")
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        return TrainConfig(mode="dpo" if command == "train" else "sft", **vars(args))
    except ValueError as e:
        parser.error(str(e))


def config_argv(config: TrainConfig) -> list[str]:
    """The flags that rebuild `config` through `parse_config` (every field, defaults included)."""
    argv = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in CLI_HIDDEN:
            continue
        flag, value = "--" + f.name.replace("_", "-"), getattr(config, f.name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


def resume_command(config: TrainConfig) -> str:
    """The shell command that continues this run."""
    import shlex

    command = "train" if config.mode == "dpo" else "sft"
    argv = config_argv(dataclasses.replace(config, resume=True))
    return " ".join(["python -m minidpo", command, *map(shlex.quote, argv)])


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
