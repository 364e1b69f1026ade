"""The policy and its reference: loading the policy (LoRA or full), the reference copy, the
reference's log-probs of a batch (adapters off, or the copy) and the precomputed table (`minidpo.refcache`).
Imports config, batching, scoring and the model layers below them.
"""
import contextlib
import copy
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from minidpo.batching import make_batch
from minidpo.checkpoint import load_model
from minidpo.config import TrainConfig, reference_mode
from minidpo.distributed import ONE, Dist, share
from minidpo.lora import apply_lora, lora_disabled, lora_layers
from minidpo.loss import needs_average
from minidpo.quant import is_quantized
from minidpo.refcache import ReferenceCache, default_root, tokenizer_digest, weights_digest
from minidpo.scoring import batch_logps, unwrap

logger = logging.getLogger(__name__)

REF_FLUSH_PAIRS = 4096  # precomputed references are written to the cache this many pairs at a time


def resolve_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The weights' dtype. A frozen LoRA base on CUDA is bf16; trained weights stay fp32 (AdamW)."""
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    return torch.bfloat16 if device.type == "cuda" and not config.full else torch.float32


def build_models(config: TrainConfig, folder: Path, device, dtype) -> tuple[nn.Module, Optional[nn.Module]]:
    """-> (policy in train mode, frozen reference copy or None). LoRA adapters are fp32."""
    model, reference = policy_and_reference(
        load_model(folder, dtype=dtype, device=device, quantize=config.quantize or None), config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("model: %s, %s%s on %s, %d trainable parameters, reference %s", folder, dtype,
                " (NF4 base)" if is_quantized(model) else "", device, trainable, reference_mode(config))
    return model, reference


def policy_and_reference(model: nn.Module, config: TrainConfig) -> tuple[nn.Module, Optional[nn.Module]]:
    """The starting `model` -> (policy in train mode: LoRA adapters (fp32) or every weight trainable,
    the frozen reference copy or None); the copy is taken before any adapter is added."""
    reference = None
    if reference_mode(config) == "copy":
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    if config.full:
        model.requires_grad_(True)
    else:
        apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                   targets=config.lora_targets)
    model.gradient_checkpointing = config.gradient_checkpointing
    return model.train(), reference


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
    separate = None if lora_layers(unwrap(model)) else model  # LoRA: adapters off; full: the model as it starts
    order = sorted(missing, key=lambda i: pairs[i].length)
    micro = config.micro_batch_size
    for start in range(0, len(order), REF_FLUSH_PAIRS):
        chunk = order[start:start + REF_FLUSH_PAIRS]
        values = torch.zeros(len(chunk), 2)
        for s in range(0, len(chunk), micro):
            mine, real = share(list(range(s, min(s + micro, len(chunk)))), d)
            batch = make_batch(pairs, [chunk[j] for j in mine], tokenizer.pad_id, device,
                               packed=config.prefix_sharing, attention=config.prefix_attention)
            logps = reference_logps(model, separate, batch, average=average).float().cpu()
            if real:
                values[mine] = torch.stack([logps[:len(mine)], logps[len(mine):]], dim=1)
        values = d.all_sum(values)
        table[torch.tensor(chunk)] = values
        if d.main:
            cache.store([pairs[i] for i in chunk], values)
    return table, len(missing)
