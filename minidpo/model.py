"""The Mistral network, with Hugging Face parameter names so checkpoints load with no mapping.

RMSNorm (computed in fp32), rotate-half RoPE, grouped-query attention through
`scaled_dot_product_attention`, sliding-window attention as Mistral defines it (query i sees
key j when i - window < j <= i, counted in sequence indices; each layer its own window,
`MistralConfig.layer_window`), a SwiGLU MLP, a tied or untied head, a KV cache for generation and
optional activation checkpointing.

Attention takes no mask where none is needed, so CUDA runs flash attention (which accepts no mask;
the kernels that accept one may not take grouped-query heads and fall back to the math kernel,
which materialises the scores: ~4 GiB per layer at 7B with 16 pairs of 1,024 tokens):
    no padding, or right padding (pads follow every real token, so causality hides them; pads are
        never scored): one `is_causal=True` call (`causal_attention`);
    left padding (generation) on CUDA: one call per distinct pad count with the pads sliced off:
        causal for the prompt, no mask for a one-token decode step (`LeftPadded`; on CPU one
        masked call is faster than several small ones);
    packed rows (prefix sharing): two causal calls (`minidpo.prefix.PackedAttention`).
What still takes a mask says why (`sdpa(..., reason=...)`): a sliding window that binds (CPU: a
small (T, T) band; CUDA: compiled FlexAttention, which skips the blocks outside the band), left
padding on CPU, new tokens after cached ones (chunked prefill), a 2-D mask with holes, a ready mask
from the caller.
"""
import dataclasses
import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint


@dataclass
class MistralConfig:
    """The keys of a Hugging Face Mistral `config.json` that change the network."""

    vocab_size: int = 32000  # rows of the embedding and the head
    hidden_size: int = 4096  # width of the residual stream
    intermediate_size: int = 14336  # width of the SwiGLU MLP
    num_hidden_layers: int = 32  # decoder layers
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: int = 8  # key/value heads (grouped-query attention)
    head_dim: Optional[int] = None  # per-head width; None means hidden_size // num_attention_heads
    max_position_embeddings: int = 32768  # longest sequence the checkpoint was made for
    rope_theta: float = 10000.0  # RoPE base
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    sliding_window: Optional[int] = 4096  # attention window in tokens; None means full causal
    tie_word_embeddings: bool = False  # head shares the embedding matrix
    hidden_act: str = "silu"  # only SiLU (SwiGLU) is Mistral's
    attention_dropout: float = 0.0  # must be 0: Mistral does not use it at fine-tuning
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = None
    torch_dtype: Optional[str] = None  # dtype the checkpoint is stored in, e.g. "bfloat16"

    def layer_window(self, i: int) -> Optional[int]:
        """The sliding window layer i attends with (None: full causal attention)."""
        return self.sliding_window

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"MistralConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotate-half RoPE")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported (Mistral uses 'silu')")

    @classmethod
    def from_dict(cls, d: dict) -> "MistralConfig":
        """Build from a `config.json` dict; unknown keys are ignored, unsupported features refused."""
        d = dict(d)
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None)  # transformers v5 / v4
        if rope:
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raise ValueError(f"RoPE scaling {rope!r} is not supported")
            d.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
        if d.get("dtype") and not d.get("torch_dtype"):
            d["torch_dtype"] = d["dtype"]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path) -> "MistralConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def to_hf_dict(self) -> dict:
        """The `config.json` transformers reads back as the same network."""
        d = dataclasses.asdict(self)
        d.pop("torch_dtype")
        d.update(architectures=["MistralForCausalLM"], model_type="mistral",
                 rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        d.pop("rope_theta")
        if self.torch_dtype:
            d["dtype"] = self.torch_dtype
        return d


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (bf16 squares lose too much), scale in the input dtype, as HF does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos, sin of shape (B, T, head_dim) for rotate-half RoPE, computed in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos, sin: (B, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache:
    """Keys and values of every layer for generation: (B, Hkv, max_len, D) each, filled left to right."""

    def __init__(self, config: MistralConfig, batch_size: int, max_len: int, *, dtype, device):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = 0  # tokens already stored
        self.max_len = max_len

    def update(self, layer: int, k, v):
        """Store k, v (B, Hkv, T, D) after the cached ones; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} requested")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, c: MistralConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_heads, self.n_kv, self.head_dim = layer_idx, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.window = c.layer_window(layer_idx)
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, attend, cache: Optional[KVCache] = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D), S = cached + T
        # enable_gqa shares each key/value head with its group of query heads without copying
        # k and v H/Hkv times per layer (same numbers as repeat_interleave).
        y = attend(q, k, v, window=self.window, enable_gqa=self.n_heads != self.n_kv)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*D)


# ---------------------------------------------------------------------------------------------------
# Attention plans: callables `(q, k, v, *, window, enable_gqa) -> y` that every layer calls with its
# own window; q (B, H, T, D), k and v (B, Hkv, S, D), y (B, H, T, D).

WINDOW_ON_CPU = "sliding window that binds, on CPU (a (T, T) band; CUDA takes FlexAttention)"
CHUNKED_PREFILL = "new tokens after cached ones: causal from the bottom right"
HOLES = "a 2-D attention_mask that is neither left- nor right-padded"
LEFT_PAD_ON_CPU = "left padding on CPU: one masked call is faster there than one call per pad count"
READY_MASK = "a ready 4-D mask from the caller"
FLEX_DEVICES = ("cuda",)  # where a binding window takes compiled FlexAttention instead of a mask
PAD_GROUP_DEVICES = ("cuda",)  # where left padding takes one mask-free call per pad count
FLEX_BACKEND = "inductor"  # torch.compile backend of FlexAttention (tests use "eager")
FLEX_BLOCK = 128  # FlexAttention's block size (create_block_mask's default)


def sdpa(q, k, v, *, mask=None, causal=False, gqa=False, reason=None):
    """The one call of scaled_dot_product_attention. A `mask` comes with the `reason` it is needed:
    with a mask CUDA cannot run flash attention (see the module docstring)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def causal_band(q_len: int, S: int, window: Optional[int], device) -> torch.Tensor:
    """(q_len, S) bool: query i, the last q_len of S positions, sees key j when i - window < j <= i."""
    q_idx = torch.arange(S - q_len, S, device=device)[:, None]  # (q_len, 1)
    k_idx = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (k_idx > q_idx - window)
    return allowed


def causal_attention(q, k, v, *, window=None, enable_gqa=False):
    """Causal self-attention over T tokens (k, v as long as q): query i sees keys i - window < j <= i.
    No mask unless the window binds (window < T): then a band on CPU, FlexAttention on CUDA."""
    T = q.shape[2]
    if window is None or window >= T:
        return sdpa(q, k, v, causal=True, gqa=enable_gqa)
    if q.device.type in FLEX_DEVICES:
        width = _flex_width(T)
        return flex(q, k, v, window_block_mask(width, window, q.device), enable_gqa, width)
    band = causal_band(T, T, window, q.device)
    return sdpa(q, k, v, mask=band, gqa=enable_gqa, reason=WINDOW_ON_CPU)


def last_queries_attention(q, k, v, *, window=None, enable_gqa=False):
    """Causal attention of q (B, H, Tq, D), the last Tq of the Sk tokens of k, v (B, Hkv, Sk, D)."""
    Tq, Sk = q.shape[2], k.shape[2]
    if Tq == Sk:
        return causal_attention(q, k, v, window=window, enable_gqa=enable_gqa)
    if Tq == 1:  # a decode step sees every key within its window: slice, no mask
        start = 0 if window is None else max(Sk - window, 0)
        return sdpa(q, k[:, :, start:], v[:, :, start:], gqa=enable_gqa)
    band = causal_band(Tq, Sk, window, q.device)
    return sdpa(q, k, v, mask=band, gqa=enable_gqa, reason=CHUNKED_PREFILL)


class LeftPadded:
    """Attention for left-padded rows (generation): row b's real keys are starts[b] .. S-1.

    Rows with the same start go through one call with their pads sliced off, so no mask is needed
    (`last_queries_attention`); the outputs of pad queries are zeros (never used, never NaN). Rows
    sorted by length (as `minidpo.generate` batches them) make each group a slice: no copies.
    """

    def __init__(self, starts: list):
        self.groups = {}
        for b, start in enumerate(starts):
            self.groups.setdefault(start, []).append(b)

    def __call__(self, q, k, v, *, window=None, enable_gqa=False):
        B, _, T, _ = q.shape
        S = k.shape[2]
        if list(self.groups) == [0]:
            return last_queries_attention(q, k, v, window=window, enable_gqa=enable_gqa)
        y = q.new_zeros(q.shape)  # (B, H, T, D)
        for start, rows in self.groups.items():
            first = max(start - (S - T), 0)  # new tokens before `start` are pads
            if first < T:
                contiguous = rows[-1] - rows[0] + 1 == len(rows)
                r = slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows, device=q.device)
                y[r, :, first:] = last_queries_attention(q[r, :, first:], k[r, :, start:], v[r, :, start:],
                                                         window=window, enable_gqa=enable_gqa)
        return y


class MaskedAttention:
    """SDPA with a boolean (B, 1, T, S) mask, built once per window by `build(window)`."""

    def __init__(self, build, reason: str):
        self.build, self.reason, self.masks = build, reason, {}

    def __call__(self, q, k, v, *, window=None, enable_gqa=False):
        if window not in self.masks:
            self.masks[window] = self.build(window)
        return sdpa(q, k, v, mask=self.masks[window], gqa=enable_gqa, reason=self.reason)


def attention_plan(attention_mask, q_len: int):
    """The attention for a (B, S) 0/1 mask whose last q_len columns are the new tokens (one sync)."""
    S = attention_mask.shape[1]
    real = attention_mask.bool()
    if q_len == S and not bool((real[:, 1:] & ~real[:, :-1]).any()):  # no pad before a real token
        return causal_attention
    build = lambda window: attention_mask_4d(attention_mask, q_len, window)  # noqa: E731
    if not bool((real[:, :-1] & ~real[:, 1:]).any()):  # left padding, or none: once real, real to the end
        starts = (S - real.sum(1)).tolist()
        if not any(starts) or attention_mask.device.type in PAD_GROUP_DEVICES:
            return LeftPadded(starts)
        return MaskedAttention(build, LEFT_PAD_ON_CPU)
    return MaskedAttention(build, HOLES)


# ---------------------------------------------------------------------------------------------------
# FlexAttention: compiled where it runs fast (CUDA), with dynamic shapes so that a new width or batch
# size does not recompile; eager elsewhere (exact, slow, no backward on CPU: tests only).

@functools.cache
def _compiled(fn, backend):
    return torch.compile(fn, dynamic=True, backend=backend)


def _flex_width(T: int) -> int:
    """Widths of one block are padded to two: a dimension of size 1 would be specialised (recompile)."""
    return max(T, FLEX_BLOCK + 1)


def _mark_dynamic(*tensors):
    for t in tensors:
        for dim in range(t.dim()):
            if t.shape[dim] > 1:
                torch._dynamo.maybe_mark_dynamic(t, dim)


def flex(q, k, v, block_mask: BlockMask, gqa: bool, width: Optional[int] = None):
    """FlexAttention of q, k, v under `block_mask`, built for `width` >= T tokens (q, k, v are
    padded to it: the extra keys come after every real query, the extra queries are dropped)."""
    T = q.shape[2]
    if width is not None and width > T:
        pad = (0, 0, 0, width - T)
        q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
    if q.device.type in FLEX_DEVICES:
        _mark_dynamic(q, k, v, *[t for t in vars(block_mask).values() if isinstance(t, torch.Tensor)])
        y = _compiled(flex_attention, FLEX_BACKEND)(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    else:
        with warnings.catch_warnings():  # "called without torch.compile()": intended here
            warnings.simplefilter("ignore", UserWarning)
            y = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    return y[:, :, :T]


def make_block_mask(mask_mod, B, width: int, device):
    """create_block_mask, compiled where FlexAttention is (the dense (width, width) mask it would
    otherwise evaluate eagerly is what flex avoids)."""
    if torch.device(device).type in FLEX_DEVICES:
        return _compiled(create_block_mask, FLEX_BACKEND)(mask_mod, B, None, width, width, device=device)
    return create_block_mask(mask_mod, B, None, width, width, device=device)


@functools.lru_cache(maxsize=64)
def window_block_mask(width: int, window: int, device) -> BlockMask:
    """Causal within `window` (on indices), for any batch: sliding-window FlexAttention."""
    def allowed(b, h, q, k):
        return (k <= q) & (k > q - window)

    return make_block_mask(allowed, None, width, device)


class MLP(nn.Module):
    def __init__(self, c: MistralConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: MistralConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(c, layer_idx)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, attend, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(attention_mask, q_len: int, window: Optional[int]):
    """Boolean (B, 1, q_len, S) mask: causal, within the window, and only real keys.

    attention_mask: (B, S) with 1 for real tokens; the last q_len keys are the queries.
    A padding query would see no key at all (NaN in softmax): it is let see itself.
    """
    S = attention_mask.shape[1]
    band = causal_band(q_len, S, window, attention_mask.device)  # (q_len, S)
    mask = band[None] & attention_mask.bool()[:, None, :]  # (B, q_len, S)
    own = torch.arange(S - q_len, S, device=band.device)[:, None] == torch.arange(S, device=band.device)
    return (mask | own[None])[:, None]  # (B, 1, q_len, S)


class Backbone(nn.Module):
    """`model.*` in Hugging Face names: embeddings, decoder layers, final norm."""

    def __init__(self, c: MistralConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Mistral(nn.Module):
    def __init__(self, config: MistralConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False  # recompute each layer in backward to save activations

    def head_weight(self):
        """The (V, H) output projection (the embedding matrix when tied)."""
        return self.lm_head.weight

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache: Optional[KVCache] = None):
        """Final-normed hidden states (B, T, H). With a cache, `attention_mask` covers cached + new tokens.

        `attention_mask` is (B, S) with 1 for real tokens, or for packed layouts a ready boolean
        (B, 1, T, S) mask (True = may attend), a FlexAttention BlockMask, or an attention plan
        `(q, k, v, *, window, enable_gqa) -> y` (`minidpo.prefix.PackedAttention`); those need
        `position_ids`. A ready mask or BlockMask is used as it is in every layer, so it must
        already encode causality and the sliding window; a plan gets each layer's window.
        """
        B, T = input_ids.shape
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
            mask = attention_mask.bool()
            attention_mask = MaskedAttention(lambda window: mask, READY_MASK)
        elif isinstance(attention_mask, BlockMask):
            block = attention_mask
            attention_mask = lambda q, k, v, *, window, enable_gqa: flex(q, k, v, block, enable_gqa)  # noqa: E731
        if callable(attention_mask):
            if position_ids is None or cache is not None:
                raise ValueError("a 4-D attention_mask needs position_ids and no KV cache")
            return self._run_layers(self.model.embed_tokens(input_ids), position_ids, attention_mask, None)
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
        if position_ids is None:
            # Positions count real tokens only, so left/right padding does not move them.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        plan = attention_plan(attention_mask, T)
        return self._run_layers(self.model.embed_tokens(input_ids), position_ids, plan, cache)

    def _run_layers(self, x, position_ids, attend, cache):
        T = x.shape[1]
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attend, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attend, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: Optional[KVCache] = None):
        """input_ids (B, T) -> logits (B, T, V) in the weights' dtype."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        w = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, dtype=w.dtype, device=w.device)

    def init_weights(self, std: float = 0.02, seed: Optional[int] = None):
        """Random normal init (HF's initializer_range) for from-scratch tiny models."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
