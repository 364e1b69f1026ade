"""Prefix sharing: one row per pair, `prompt + chosen + rejected`, so the prompt is computed once.

    packed_collate(pairs, pad_id)      -> a packed batch of B rows (not 2B)
    packed_attention_mask(segments, position_ids, window) -> (B, 1, Tp, Tp) bool, True = may attend
                                          (the rule; tests compare against it)
    PackedAttention(segments)          -> the same attention in two causal SDPA calls with no mask
                                          (the default, `attention="sdpa"`)
    PackedFlexAttention(segments, position_ids) -> the rule as FlexAttention BlockMasks
                                          (`attention="flex"`: CUDA; opt-in)
    packed_logps(model, batch)         -> [2B] fp32, chosen rows then rejected rows, as the
                                          unshared `minidpo.scoring.batch_logps` orders them

Layout of row b (right padded to Tp, the longest `n + mc + mr`):

    index      0 .. n-1 | n .. n+mc-1 | n+mc .. n+mc+mr-1 | pad
    segment        0    |      1      |         2         |  -1
    position   0 .. n-1 | n .. n+mc-1 | n    .. n+mr-1    |   0

Rejected positions continue from the prompt's end, as in a row of their own. A query may attend a
key of its own segment or of the prompt, never the other reply, causally and within Mistral's
sliding window, both counted on positions (not indices): each token sees exactly the keys it sees
in the unshared row, at the same RoPE positions, so its hidden state is the same. A pad sees only
itself (a softmax over no key would be NaN); pads are never scored and never seen.

Labels are TARGETS, already shifted, unlike `minidpo.data.collate`'s: `labels_chosen[b, i]` is the
token that follows index i in the prompt + chosen sequence (-100 where none is scored), so the
hidden state at index i scores it directly. The prompt's last index has a target in both arrays:
it predicts the first chosen token and the first rejected token.
"""
from typing import Optional, Sequence

import torch
from torch import nn

from minidpo.logprobs import IGNORE_INDEX, model_logprobs
from minidpo.model import FLEX_DEVICES, _flex_width, _mark_dynamic, causal_attention, flex, make_block_mask

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1


def packed_collate(pairs: Sequence, pad_id: int) -> dict:
    """B TokenizedPairs -> `input_ids`, `position_ids`, `labels_chosen`, `labels_rejected` [B, Tp]
    int64 and `segments` [B, Tp] int8 (0 prompt, 1 chosen, 2 rejected, -1 pad); see the module doc.

    The attention is not built here: it depends on each layer's sliding window, and its index
    tables are cheaper to build on the device (`PackedAttention`, built by `packed_logps`).
    """
    if not pairs:
        raise ValueError("packed_collate: no pairs")
    if pad_id is None:
        raise ValueError("packed_collate: pad_id is None (the tokenizer has no pad token)")
    width = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    shape = (len(pairs), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, PAD, dtype=torch.int8)
    labels_chosen = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    labels_rejected = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for b, pair in enumerate(pairs):
        prompt, chosen, rejected = list(pair.prompt_ids), list(pair.chosen_ids), list(pair.rejected_ids)
        n, mc, mr = len(prompt), len(chosen), len(rejected)
        end = n + mc + mr
        input_ids[b, :end] = torch.tensor(prompt + chosen + rejected, dtype=torch.long)
        position_ids[b, :end] = torch.cat([torch.arange(n + mc), torch.arange(n, n + mr)])
        segments[b, n:n + mc], segments[b, n + mc:end] = CHOSEN, REJECTED
        segments[b, :n] = PROMPT
        # Index i scores the token after it in its own sequence; the first reply token is scored
        # only when a prompt token precedes it (as `labels[:, 1:]` does in the unshared row).
        own = prompt + chosen
        start = max(n - 1, 0)
        labels_chosen[b, start:n + mc - 1] = torch.tensor(own[start + 1:], dtype=torch.long)
        if n and mr:
            labels_rejected[b, n - 1] = rejected[0]
        labels_rejected[b, n + mc:end - 1] = torch.tensor(rejected[1:], dtype=torch.long)
    return {"input_ids": input_ids, "position_ids": position_ids, "segments": segments,
            "labels_chosen": labels_chosen, "labels_rejected": labels_rejected}


def is_packed(batch: dict) -> bool:
    """Whether `batch` is `packed_collate`'s layout (else `minidpo.data.collate`'s)."""
    return "segments" in batch


def packed_attention_mask(segments: torch.Tensor, position_ids: torch.Tensor,
                          window: Optional[int]) -> torch.Tensor:
    """segments, position_ids [B, Tp] -> (B, 1, Tp, Tp) bool, True where query i may attend key j.

    i sees j when j is the prompt or i's own reply, pos(i) - window < pos(j) <= pos(i), and both
    are real tokens; a pad sees only itself.
    """
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]  # (B, Tp, 1), (B, 1, Tp)
    pos_q, pos_k = position_ids[:, :, None], position_ids[:, None, :]
    allowed = ((seg_k == PROMPT) | (seg_k == seg_q)) & (pos_k <= pos_q)
    if window is not None:
        allowed = allowed & (pos_k > pos_q - window)
    allowed = allowed & (seg_q != PAD) & (seg_k != PAD)  # (B, Tp, Tp)
    index = torch.arange(segments.shape[1], device=segments.device)
    allowed = allowed | (index[:, None] == index[None, :])
    return allowed[:, None]  # (B, 1, Tp, Tp)


class PackedAttention:
    """Exact attention over packed rows in two causal SDPA calls, with no mask (flash on CUDA):
      1. indices 0 .. L1-1, L1 = max(n + mc), causally: exact for every prompt and chosen query,
         whose causal keys are all prompt or chosen (outputs at rejected or pad indices in this
         range are dropped);
      2. each row's prompt + rejected tokens gathered into L2 = max(n + mr) slots, in order, so
         they form the unshared rejected row (positions 0 .. n+mr-1), causally; the rejected
         queries' outputs are scattered back to their indices (the prompt's are recomputed and
         dropped: at 7B attention is ~2% of a token's FLOPs, the linear layers stay shared).
    A sliding window is applied inside each piece on slot indices, which are the positions, by
    `minidpo.model.causal_attention`. Slots past a row's end hold copies of index 0: they come
    after every real query, so causality hides them. Pad outputs are zero or causal garbage:
    pads are never scored and never attended.

    Called as an attention plan `attention(q, k, v, window=, enable_gqa=)` with q (B, H, Tp, D),
    k, v (B, Hkv, Tp, D) -> (B, H, Tp, D).
    """

    def __init__(self, segments: torch.Tensor):
        """segments [B, Tp] int8 (packed_collate's): index tables built once per forward."""
        width, device = segments.shape[1], segments.device
        n, mc, mr = [(segments == s).sum(1)[:, None] for s in (PROMPT, CHOSEN, REJECTED)]  # (B, 1) each
        self.l1 = max(int((n + mc).max()), 1)
        j = torch.arange(max(int((n + mr).max()), 1), device=device)[None]  # (1, L2) gathered slots
        rejected = (j >= n) & (j < n + mr)  # (B, L2)
        # Slot j holds prompt index j, then rejected index j + mc; index 0 past the row's end.
        self.index = torch.where(j < n, j, torch.where(rejected, j + mc, 0))  # (B, L2)
        # Where slot j's output goes: a rejected token's index, else a spare slot past the row.
        self.out_index = torch.where(rejected, j + mc, width)  # (B, L2)

    def __call__(self, q, k, v, *, window=None, enable_gqa=False):
        B, H, width, D = q.shape
        l1 = self.l1
        first = causal_attention(q[:, :, :l1], k[:, :, :l1], v[:, :, :l1], window=window,
                                 enable_gqa=enable_gqa)  # (B, H, L1, D)
        second = causal_attention(_take(q, self.index), _take(k, self.index), _take(v, self.index),
                                  window=window, enable_gqa=enable_gqa)  # (B, H, L2, D)
        y = torch.cat([first, first.new_zeros(B, H, width + 1 - l1, D)], dim=2)  # (B, H, Tp + 1, D)
        y = y.scatter(2, self.out_index[:, None, :, None].expand(-1, H, -1, D), second)
        return y[:, :, :width]


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), index (B, N) -> (B, H, N, D): the same N token slots of every head."""
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


class PackedFlexAttention:
    """`packed_attention_mask`'s rule as FlexAttention BlockMasks (one per window, built lazily):
    blocks no query may attend are skipped by the compiled kernel (CUDA). The rows are padded to
    at least two blocks (see `minidpo.model.flex`); segments and positions are marked dynamic,
    so a new width or batch size does not recompile. On CPU FlexAttention runs eagerly and has no
    backward."""

    def __init__(self, segments: torch.Tensor, position_ids: torch.Tensor):
        width = _flex_width(segments.shape[1])
        pad = (0, width - segments.shape[1])
        self.seg = torch.nn.functional.pad(segments.long(), pad, value=PAD)  # (B, W)
        self.pos = torch.nn.functional.pad(position_ids, pad)  # (B, W)
        self.masks = {}

    def __call__(self, q, k, v, *, window=None, enable_gqa=False):
        if window not in self.masks:
            self.masks[window] = packed_block_mask(self.seg, self.pos, window)
        return flex(q, k, v, self.masks[window], enable_gqa, self.seg.shape[1])


def packed_block_mask(segments: torch.Tensor, position_ids: torch.Tensor, window: Optional[int]):
    """`packed_attention_mask`'s rule as a FlexAttention BlockMask over [B, W] segments/positions."""
    seg, pos = segments.long(), position_ids
    if seg.device.type in FLEX_DEVICES:
        _mark_dynamic(seg, pos)

    def allowed(b, h, q, k):
        sq, sk, pq, pk = seg[b, q], seg[b, k], pos[b, q], pos[b, k]
        ok = ((sk == PROMPT) | (sk == sq)) & (pk <= pq) & (sq != PAD) & (sk != PAD)
        if window is not None:
            ok = ok & (pk > pq - window)
        return ok | (q == k)

    return make_block_mask(allowed, seg.shape[0], seg.shape[1], seg.device)


def packed_logps(model: nn.Module, batch: dict, *, average: bool = False) -> torch.Tensor:
    """[2B] fp32 log-probs of the chosen then the rejected replies of a packed batch (summed, or
    per-token means): one forward for both replies.

    The batch's `attention` ("sdpa", the default, or "flex") picks `PackedAttention` or
    `PackedFlexAttention`. With a plain head the fused head scores the targets of each branch straight
    from the hidden states (only scored indices go through the head); otherwise the logits are built once.
    """
    ids, positions = batch["input_ids"], batch["position_ids"]
    if batch.get("attention", "sdpa") == "flex":
        mask = PackedFlexAttention(batch["segments"], positions)
    else:
        mask = PackedAttention(batch["segments"])
    targets = (batch["labels_chosen"], batch["labels_rejected"])
    return model_logprobs(model, ids, targets, attention=mask, position_ids=positions, average=average)
