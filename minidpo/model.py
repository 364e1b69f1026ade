"""The Mistral network, with Hugging Face parameter names so checkpoints load with no mapping; the
same module is Llama (optional biases, Llama 3's RoPE scaling) and Qwen2 (q/k/v biases, per-layer
windows), switched by the fields of `MistralConfig` that their `config.json` files set.

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
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from minidpo.files import read_json


# config.json's `architectures[0]` -> `model_type`: the families this one network implements.
ARCHITECTURES = {"MistralForCausalLM": "mistral", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# transformers' defaults where they differ from the fields' below: they fill keys a config.json omits.
FAMILY_DEFAULTS = {
    "mistral": dict(rms_norm_eps=1e-6, max_position_embeddings=131072),
    "llama": dict(intermediate_size=11008, num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "qwen2": dict(vocab_size=151936, intermediate_size=22016, num_key_value_heads=32, rms_norm_eps=1e-6,
                  bos_token_id=None, eos_token_id=None),
}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class MistralConfig:
    """The keys of a Hugging Face Mistral, Llama or Qwen2 `config.json` that change the network."""

    vocab_size: int = 32000  # rows of the embedding and the head
    hidden_size: int = 4096  # width of the residual stream
    intermediate_size: int = 14336  # width of the SwiGLU MLP
    num_hidden_layers: int = 32  # decoder layers
    num_attention_heads: int = 32  # query heads
    num_key_value_heads: Optional[int] = 8  # key/value heads (grouped-query attention); None: one per query head
    head_dim: Optional[int] = None  # per-head width; None means hidden_size // num_attention_heads
    max_position_embeddings: int = 32768  # longest sequence the checkpoint was made for
    rope_theta: float = 10000.0  # RoPE base
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    sliding_window: Optional[int] = 4096  # attention window in tokens; None means full causal
    tie_word_embeddings: bool = False  # head shares the embedding matrix
    hidden_act: str = "silu"  # only SiLU (SwiGLU) is Mistral's
    attention_dropout: float = 0.0  # must be 0: Mistral does not use it at fine-tuning
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2  # Llama 3 writes a list
    pad_token_id: Optional[int] = None
    torch_dtype: Optional[str] = None  # dtype the checkpoint is stored in, e.g. "bfloat16"
    model_type: str = "mistral"  # "mistral", "llama" or "qwen2": the family saved back
    attention_bias: bool = False  # Llama: bias on q/k/v/o (Qwen2 always has q/k/v bias, never o)
    mlp_bias: bool = False  # Llama: bias on gate/up/down
    rope_scaling: Optional[dict] = None  # "llama3" scaling: rope_type and LLAMA3_KEYS (Llama 3.1+)
    use_sliding_window: bool = False  # Qwen2: False switches sliding_window off
    max_window_layers: int = 28  # Qwen2: layers from this index on use the window (if no layer_types)
    layer_types: Optional[list] = None  # Qwen2: "full_attention" / "sliding_attention" per layer

    def __post_init__(self):
        if self.model_type not in FAMILY_DEFAULTS:
            raise ValueError(f"model_type {self.model_type!r} is not supported (known: {', '.join(FAMILY_DEFAULTS)})")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
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
        self._family_rules()
        if self.rope_scaling is not None and (self.rope_scaling.get("rope_type") != "llama3" or
                                              any(self.rope_scaling.get(k) is None for k in LLAMA3_KEYS)):
            raise ValueError(f"rope_scaling must be llama3's {{'rope_type': 'llama3', {', '.join(LLAMA3_KEYS)}}}, "
                             f"got {self.rope_scaling!r}")

    def _family_rules(self):
        """What transformers' LlamaConfig / Qwen2Config make of the keys they share with Mistral."""
        if self.model_type != "llama":  # Mistral's and Qwen2's modules have no such switches
            self.attention_bias = self.mlp_bias = False
        if self.model_type == "llama":
            self.sliding_window = None  # Llama attends fully; transformers ignores the key
        if self.model_type != "qwen2":
            self.layer_types = None
            return
        self.sliding_window = self.sliding_window if self.use_sliding_window else None
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                                else "full_attention" for i in range(self.num_hidden_layers)]
        types = list(self.layer_types)
        if len(types) != self.num_hidden_layers or not set(types) <= {"full_attention", "sliding_attention"}:
            raise ValueError(f"layer_types must name full_attention or sliding_attention for each of the "
                             f"{self.num_hidden_layers} layers, got {types!r}")
        if "sliding_attention" in types and self.sliding_window is None:
            raise ValueError("layer_types has sliding_attention layers but there is no sliding window "
                             "(use_sliding_window is false or sliding_window is null)")

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    def layer_window(self, i: int) -> Optional[int]:
        """The window layer `i` attends with (None: full causal): Qwen2's `layer_types`, else `sliding_window`."""
        if self.layer_types is not None and self.layer_types[i] == "full_attention":
            return None
        return self.sliding_window

    @classmethod
    def from_dict(cls, d: dict) -> "MistralConfig":
        """Build from a `config.json` dict as transformers reads it; unknown keys are ignored, an
        unknown architecture or RoPE scaling is refused."""
        arch = (d.get("architectures") or [None])[0]
        model_type = ARCHITECTURES.get(arch) if arch else d.get("model_type", "mistral")
        if model_type not in FAMILY_DEFAULTS:
            raise ValueError(f"architecture {arch or model_type!r} is not supported; minidpo implements "
                             f"{', '.join(ARCHITECTURES)}")
        d = {**FAMILY_DEFAULTS[model_type], **d, "model_type": model_type}
        rope = d.pop("rope_scaling", None) or d.pop("rope_parameters", None)  # v4 key first, as transformers
        if rope:
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind not in ("default", "llama3") or rope.get("partial_rotary_factor", 1.0) != 1.0:
                raise ValueError(f"RoPE scaling {rope!r} is not supported (minidpo implements 'default' and "
                                 f"'llama3')")
            d["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", cls.rope_theta))
            if kind == "llama3":  # a top-level original_max_position_embeddings wins, as in transformers
                original = d.get("original_max_position_embeddings") or rope.get(
                    "original_max_position_embeddings", d.get("max_position_embeddings"))
                d["rope_scaling"] = {**{k: rope.get(k) for k in LLAMA3_KEYS}, "rope_type": "llama3",
                                     "original_max_position_embeddings": original}
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
        d = read_json(path)
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e

    def to_hf_dict(self) -> dict:
        """The `config.json` transformers reads back as the same network, of the same family."""
        d = dataclasses.asdict(self)
        for key in ("torch_dtype", "rope_theta", "rope_scaling"):
            d.pop(key)
        unused = {"mistral": ("attention_bias", "mlp_bias", "use_sliding_window", "max_window_layers", "layer_types"),
                  "llama": ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types"),
                  "qwen2": ("attention_bias", "mlp_bias")}[self.model_type]
        for key in unused:
            d.pop(key)
        architecture = next(a for a, t in ARCHITECTURES.items() if t == self.model_type)
        d.update(architectures=[architecture],
                 rope_parameters={"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta})
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


def rope_inv_freq(c: MistralConfig, device=None):
    """(head_dim/2,) fp32 inverse frequencies; with Llama 3's scaling, as transformers computes them."""
    inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, device=device).float() / c.head_dim)
    if c.rope_scaling is None:
        return inv_freq
    factor, low, high, original = (c.rope_scaling[k] for k in LLAMA3_KEYS)
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths slow down by `factor`, short ones stay, the band between blends the two
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    middle = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(middle, blended, scaled)


def rope_cos_sin(position_ids, config: MistralConfig, dtype):
    """cos, sin of shape (B, T, head_dim) for rotate-half RoPE, computed in fp32."""
    freqs = position_ids.float()[..., None] * rope_inv_freq(config, position_ids.device)  # (B, T, D/2)
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
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=c.attention_bias)

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
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

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
        ready = isinstance(attention_mask, BlockMask) or (isinstance(attention_mask, torch.Tensor)
                                                          and attention_mask.dim() == 4)
        windows = {layer.self_attn.window for layer in self.model.layers}
        if ready and len(windows) > 1:
            raise ValueError(f"a ready mask serves every layer, but this model's layers attend with "
                             f"different windows ({self.config.layer_types}); pass an attention plan")
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
        cos, sin = rope_cos_sin(position_ids, self.config, x.dtype)
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
