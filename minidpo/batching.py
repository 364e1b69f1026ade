"""Pairs to batches: the eval split and training subset, each epoch's batches, one optimizer step's
micro-batches (each rank's share), collated onto the device in either layout (two rows a pair, or one
packed row, `minidpo.prefix`). Imports config and the data layers below it (data, prefix, distributed).
"""
import hashlib
import logging
import random

import torch

from minidpo.config import TrainConfig
from minidpo.data import IGNORE_INDEX, batches, collate, load_pairs, subset, tokenize_pairs
from minidpo.distributed import ONE, Dist, share
from minidpo.prefix import is_packed, packed_collate
from minidpo.refcache import pair_digest

logger = logging.getLogger(__name__)


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
    Each carries `real`: 1.0, or 0.0 for a stand-in pair on a rank left without one (it runs the
    forward and backward the other ranks run, and counts for nothing)."""
    out = []
    for i in range(0, len(indices), config.micro_batch_size):
        mine, real = share(indices[i:i + config.micro_batch_size], d)
        batch = make_batch(pairs, mine, pad_id, device, ref_table=ref_table, chosen_only=config.mode == "sft",
                           packed=config.prefix_sharing, attention=config.prefix_attention)
        out.append({**batch, "real": real})
    return out


def step_pairs(micro_batches: list[dict], d: Dist) -> float:
    """The step's pairs over every rank's micro-batches (stand-in pairs not counted)."""
    return _all_ranks(sum(b.get("real", 1.0) * pair_count(b) for b in micro_batches), d)


def step_scored_tokens(micro_batches: list[dict], d: Dist) -> float:
    """The step's scored reply tokens over every rank's micro-batches (stand-ins not counted)."""
    return _all_ranks(sum(b.get("real", 1.0) * b["scored"] for b in micro_batches), d)


def _all_ranks(local: float, d: Dist) -> float:
    return float(d.all_sum(torch.tensor(float(local), dtype=torch.float64)))


def data_digest(pairs: list) -> str:
    """Identifies the training pairs and their order, so a resume on other data is refused."""
    h = hashlib.blake2b(digest_size=16)
    for pair in pairs:
        h.update(pair_digest(pair))
    return h.hexdigest()
def chosen_tokens(batch: dict) -> torch.Tensor:
    """[b] int64 on the batch's device: scored tokens of each chosen reply (for the NLL per token)."""
    labels = batch["labels_chosen"] if is_packed(batch) else batch["labels"][:pair_count(batch), 1:]
    return (labels != IGNORE_INDEX).sum(-1)
