"""Prefix sharing: one row per pair, `prompt + chosen + rejected`, so the prompt is computed once.

    packed_collate(pairs, pad_id)      -> a packed batch of B rows (not 2B)
    packed_attention_mask(segments, position_ids, window) -> (B, 1, Tp, Tp) bool, True = may attend
    packed_attention(segments, position_ids, window) -> PackedAttention (the same attention in two
                                          cheaper SDPA calls) where no sliding window binds, else
                                          the mask above (the default, `attention="sdpa"`)
    packed_block_mask(segments, position_ids, window) -> the same rule as a FlexAttention BlockMask
                                          (`attention="flex"`: CUDA; measured nowhere yet, so opt-in)
    packed_logps(model, batch)         -> [2B] fp32, chosen rows then rejected rows, as the
                                          unshared `minidpo.train.batch_logps` orders them

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
import contextlib
from typing import Optional, Sequence

import torch
from torch import nn

from minidpo.logprobs import sequence_logprobs, sequence_logprobs_from_hidden

IGNORE_INDEX = -100
PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1


def packed_collate(pairs: Sequence, pad_id: int) -> dict:
    """B TokenizedPairs -> `input_ids`, `position_ids`, `labels_chosen`, `labels_rejected` [B, Tp]
    int64 and `segments` [B, Tp] int8 (0 prompt, 1 chosen, 2 rejected, -1 pad); see the module doc.

    The 4-D mask is not built here: it depends on the model's sliding window, and it is cheaper to
    build on the device (`packed_attention_mask`, called by `packed_logps`).
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


def packed_attention(segments: torch.Tensor, position_ids: torch.Tensor, window: Optional[int]):
    """The attention a packed batch needs: a `PackedAttention` when no sliding window binds (no two
    tokens of a row are `window` positions apart), else `packed_attention_mask`'s dense mask.

    `minidpo.model` takes either in place of the 2-D attention mask (see PackedAttention).
    """
    if window is None or window > int(position_ids.max()):
        return PackedAttention(segments)
    return packed_attention_mask(segments, position_ids, window)


class PackedAttention:
    """Exact attention over packed rows in two pieces instead of one dense masked (Tp, Tp) product.

    With a dense mask, SDPA computes every query against every key of the row (on CPU, flash
    skips key blocks only for `is_causal`), so a packed row of width Tp = n + mc + mr costs Tp^2
    however little of it the mask allows. Here:
      1. indices 0 .. L1-1, L1 = max(n + mc), causally (`is_causal`, blocks above the diagonal
         skipped): exact for every prompt and chosen query, whose causal keys are all prompt or
         chosen (outputs at rejected or pad indices in this range are dropped);
      2. the rejected queries (Lr = max mr) against their row's prompt + rejected keys, gathered
         into L2 = max(n + mr) slots, with a small mask: prompt keys, and rejected keys causally.
    About L1^2 / 2 + Lr * L2 instead of Tp^2 per row and head. Pad outputs are zero (or causal
    garbage inside piece 1): pads are never scored and never attended. Not for sliding windows
    that bind: `packed_attention` then gives the dense mask.

    Called as `attention(q, k, v, enable_gqa=...)` with q (B, H, Tp, D), k, v (B, Hkv, Tp, D)
    -> (B, H, Tp, D), in place of `scaled_dot_product_attention(q, k, v, attn_mask=mask, ...)`.
    """

    def __init__(self, segments: torch.Tensor):
        """segments [B, Tp] int8 (packed_collate's): index tables built once per forward."""
        width, device = segments.shape[1], segments.device
        n, mc, mr = [(segments == s).sum(1)[:, None] for s in (PROMPT, CHOSEN, REJECTED)]  # (B, 1) each
        self.l1 = max(int((n + mc).max()), 1)
        r = torch.arange(max(int(mr.max()), 1), device=device)[None]  # (1, Lr) rejected offsets
        j = torch.arange(max(int((n + mr).max()), 1), device=device)[None]  # (1, L2) gathered key slots
        real_q, real_k = r < mr, j < n + mr  # (B, Lr), (B, L2)
        # Index of rejected query r in the row; `width` (a slot past the row) where there is none.
        self.q_index = torch.where(real_q, n + mc + r, width)  # (B, Lr)
        # Key slot j: prompt index j, else rejected index j + mc; 0 (masked) past the row's keys.
        self.k_index = torch.where(j < n, j, torch.where(real_k, j + mc, 0))  # (B, L2)
        n3 = n[:, :, None]
        allowed = (j[:, None] < n3) | ((j[:, None] - n3 <= r[..., None]) & real_k[:, None])  # (B, Lr, L2)
        allowed = allowed | (~real_q[..., None] & (j[:, None] == 0))  # no query: see one key, not NaN
        self.mask = allowed[:, None]  # (B, 1, Lr, L2)

    def __call__(self, q, k, v, enable_gqa: bool = False):
        B, H, width, D = q.shape
        sdpa = torch.nn.functional.scaled_dot_product_attention
        first = sdpa(q[:, :, :self.l1], k[:, :, :self.l1], v[:, :, :self.l1], is_causal=True,
                     enable_gqa=enable_gqa)  # (B, H, L1, D)
        rejected = sdpa(_take(q, self.q_index.clamp(max=width - 1)), _take(k, self.k_index),
                        _take(v, self.k_index), attn_mask=self.mask, enable_gqa=enable_gqa)  # (B, H, Lr, D)
        # One spare slot past the row takes the outputs of missing rejected queries.
        y = torch.cat([first, first.new_zeros(B, H, width + 1 - self.l1, D)], dim=2)  # (B, H, Tp + 1, D)
        y = y.scatter(2, self.q_index[:, None, :, None].expand(-1, H, -1, D), rejected)
        return y[:, :, :width]


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), index (B, N) -> (B, H, N, D): the same N token slots of every head."""
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def packed_block_mask(segments: torch.Tensor, position_ids: torch.Tensor, window: Optional[int]):
    """`packed_attention_mask`'s rule as a FlexAttention BlockMask: blocks no query may attend are
    skipped by the (compiled, CUDA) kernel. On CPU FlexAttention runs eagerly and has no backward."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, width = segments.shape
    seg = segments.long()

    def allowed(b, h, q, k):
        sq, sk, pq, pk = seg[b, q], seg[b, k], position_ids[b, q], position_ids[b, k]
        ok = ((sk == PROMPT) | (sk == sq)) & (pk <= pq) & (sq != PAD) & (sk != PAD)
        if window is not None:
            ok = ok & (pk > pq - window)
        return ok | (q == k)

    return create_block_mask(allowed, B, None, width, width, device=segments.device)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere: the same as minidpo.train.autocast."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def packed_logps(model: nn.Module, batch: dict, *, average: bool = False) -> torch.Tensor:
    """[2B] fp32 log-probs of the chosen then the rejected replies of a packed batch (summed, or
    per-token means): one forward for both replies.

    The batch's `attention` ("sdpa", the default, or "flex") picks `packed_attention` or
    `packed_block_mask`. With a plain head the fused head scores the targets of each branch straight
    from the hidden states (only scored indices go through the head); otherwise the logits are built once.
    """
    ids, positions = batch["input_ids"], batch["position_ids"]
    build = packed_block_mask if batch.get("attention", "sdpa") == "flex" else packed_attention
    mask = build(batch["segments"], positions, model.config.layer_window(0))  # every layer's (checked by the model)
    targets = (batch["labels_chosen"], batch["labels_rejected"])
    if type(model.lm_head) is nn.Linear:
        with _autocast(ids.device):
            hidden = model.hidden_states(ids, mask, positions)
        dtype = torch.bfloat16 if ids.device.type == "cuda" else hidden.dtype
        hidden, weight = hidden.to(dtype), model.head_weight().to(dtype)
        return torch.cat([sequence_logprobs_from_hidden(hidden, weight, t, average=average) for t in targets])
    with _autocast(ids.device):
        logits = model(ids, mask, positions)
    return torch.cat([sequence_logprobs(logits, t, average=average) for t in targets])
