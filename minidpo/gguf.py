"""GGUF files (llama.cpp's format) -> minidpo's model and tokenizer, through the `gguf` package.

`load_model("model.gguf")` and `load_tokenizer("model.gguf")` land here. The file's metadata is the
config (llama.cpp's keys, e.g. `llama.block_count`) and the tokenizer (`tokenizer.ggml.*`); tensors
are dequantized to fp32 with the package's own readers (`gguf.quants.dequantize`). Two things llama.cpp
changed on conversion are undone as transformers undoes them:

* names: `blk.{i}.attn_q.weight` is `model.layers.{i}.self_attn.q_proj.weight`, and so on (`hf_name`);
* for the llama architecture, the rows of Q and K were permuted from rotate-half RoPE to llama.cpp's
  interleaved pairs: per head, row (j, half) moved to (half, j); `unpermute` reverses it.

Llama 3.1's RoPE scaling is stored by llama.cpp as a `rope_freqs` tensor rather than as keys; such
files are refused with a clear error (transformers ignores that tensor, silently changing the model).
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from minidpo import spm
from minidpo.model import MistralConfig

# GGML types read here (`gguf.GGMLQuantizationType` names).
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
# `tokenizer.ggml.pre` -> the split regex of that vocabulary (Llama 3's and Qwen2's tokenizer.json);
# other names use GPT-2's byte-level split, as transformers does.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {**dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
          **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT)}
GPT2_SPLIT_NAMES = ("default", "gpt2", "gpt-2", "smollm")


def is_gguf(path) -> bool:
    return str(path).lower().endswith(".gguf")


def open_gguf(path):
    """A `gguf.GGUFReader` on `path` (memory-mapped); errors name the file or the missing package.
    The last file's reader is kept: the tokenizer and the model are read from one file in turn, and
    parsing its metadata takes seconds."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    stat = path.stat()
    return _reader(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _reader(path: str, mtime_ns: int, size: int):
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf "
                          "(or pip install 'minidpo[gguf]')") from e
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e


def metadata(reader) -> dict:
    """Every key-value field of the file as Python values (str, int, float, lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


# ---------------------------------------------------------------------------------------------------
# the model

def model_config(meta: dict, names: set[str], where) -> MistralConfig:
    """The config llama.cpp's keys describe, read as transformers reads a GGUF of that architecture;
    biases are there when the file has their tensors."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where}: GGUF architecture {arch!r} is not supported (minidpo reads "
                         f"{', '.join(ARCHITECTURES)})")
    key = lambda name: meta.get(f"{arch}.{name}")  # noqa: E731
    if key("rope.scaling.type") not in (None, "none") or "rope_freqs.weight" in names:
        raise ValueError(f"{where}: RoPE scaling ({key('rope.scaling.type') or 'a rope_freqs tensor'}) is not "
                         f"supported in GGUF files; load the Hugging Face folder, whose config.json "
                         f"states it")
    d = {"architectures": [ARCHITECTURES[arch]], "max_position_embeddings": key("context_length"),
         "num_hidden_layers": key("block_count"), "intermediate_size": key("feed_forward_length"),
         "hidden_size": key("embedding_length"), "num_attention_heads": key("attention.head_count"),
         "num_key_value_heads": key("attention.head_count_kv"),
         "rms_norm_eps": key("attention.layer_norm_rms_epsilon"), "rope_theta": key("rope.freq_base"),
         "head_dim": key("rope.dimension_count") if arch == "llama" else None,
         "vocab_size": key("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ())) or None,
         "tie_word_embeddings": "output.weight" not in names,
         "attention_bias": "blk.0.attn_output.bias" in names, "mlp_bias": "blk.0.ffn_up.bias" in names,
         "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
         "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
         "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}
    try:
        return MistralConfig.from_dict({k: v for k, v in d.items() if v is not None})
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from e


def hf_name(name: str) -> str:
    """llama.cpp's tensor name -> the Hugging Face one (unknown names are returned as they are)."""
    base, _, suffix = name.rpartition(".")
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{suffix}"
    return f"{_TOP[base]}.{suffix}" if base in _TOP else name


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: (heads, 2, D/2) rows were written as (heads, D/2, 2)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize(t, dtype, chunk_bytes=1 << 24) -> torch.Tensor:
    """One GGUF tensor as a `dtype` tensor, dequantized `chunk_bytes` of the file at a time (so the
    fp32 temporaries stay small whatever the tensor's size)."""
    from gguf import dequantize as reference

    out = torch.empty(tuple(reversed(t.shape.tolist())), dtype=dtype)  # GGUF lists dims innermost first
    data, flat = t.data.reshape(out.shape[0], -1) if out.dim() > 1 else t.data[None], out.view(-1, out.shape[-1])
    step = max(1, chunk_bytes // max(1, data[0].nbytes))
    for i in range(0, len(data), step):
        # F32 comes back as a read-only view of the file: torch wants a writable chunk
        flat[i:i + step] = torch.from_numpy(np.require(reference(data[i:i + step], t.tensor_type), np.float32, "W"))
    return out


def read_tensors(reader, config: MistralConfig, *, dtype, device, where):
    """Yield (HF name, tensor) for every tensor of the file, dequantized, Q/K rows restored."""
    for t in reader.tensors:
        if t.tensor_type.name not in TYPES:
            raise ValueError(f"{where}: tensor {t.name} is {t.tensor_type.name}; minidpo dequantizes "
                             f"{', '.join(TYPES)}")
        w = dequantize(t, dtype)
        if config.model_type == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            w = unpermute(w, config.num_attention_heads if ".attn_q." in t.name else config.num_key_value_heads)
        yield hf_name(t.name), w.to(device)


def load_gguf_model(path, *, dtype=None, device="cpu", quantize=None):
    """`.gguf` file -> `Mistral` (a Llama or Qwen2 config), strict; `dtype=None` is fp32;
    `quantize="nf4"` stores the Linear weights in NF4 (as `minidpo.load_model`)."""
    from minidpo.checkpoint import fill_model

    reader = open_gguf(path)
    names = {t.name for t in reader.tensors}
    config = model_config(metadata(reader), names, path)
    dtype = dtype or torch.float32
    model = fill_model(config, [read_tensors(reader, config, dtype=dtype, device=device, where=path)], path,
                       quantize=quantize)
    config.torch_dtype = str(dtype).removeprefix("torch.")
    return model


# ---------------------------------------------------------------------------------------------------
# the tokenizer

def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE vocabularies are spelled in it)."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def _byte_level_backend(meta: dict) -> Backend:
    """`tokenizer.ggml.model == "gpt2"`: byte-level BPE over the file's vocabulary and merges."""
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", ())]
    backend = Backend(BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in GPT2_SPLIT_NAMES:
            warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known to minidpo; splitting as GPT-2 does "
                          f"(as transformers does); llama.cpp may split differently", stacklevel=3)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(meta: dict) -> Backend:
    """`tokenizer.ggml.model == "llama"`: SentencePiece BPE rebuilt by `minidpo.spm` (a "▁" before
    every span between special tokens, as SentencePiece and llama.cpp do)."""
    types = meta.get("tokenizer.ggml.token_type") or [spm.NORMAL] * len(meta["tokenizer.ggml.tokens"])
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(types)
    # user-defined tokens are matched whole in text, as control tokens are (llama.cpp does both)
    pieces = [spm.Piece(t, s, spm.CONTROL if k == spm.USER_DEFINED else k)
              for t, s, k in zip(meta["tokenizer.ggml.tokens"], scores, types)]
    model = spm.SentencePieceModel(pieces=pieces, model_type=2, byte_fallback=spm.BYTE in types,
                                   unk_id=meta.get("tokenizer.ggml.unknown_token_id", 0),
                                   add_dummy_prefix=meta.get("tokenizer.ggml.add_space_prefix", True),
                                   remove_extra_whitespaces=False)
    return spm.to_tokenizers(model, add_bos=False)


def tokenizer_parts(path) -> tuple[Backend, dict, str | None]:
    """(backend without bos/eos post-processing, tokenizer config, chat template or None) of a GGUF."""
    meta = metadata(open_gguf(path))
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"{path}: GGUF tokenizer {kind!r} is not supported (minidpo reads 'llama', "
                         f"SentencePiece-style, and 'gpt2', byte-level BPE)")
    tokens = meta["tokenizer.ggml.tokens"]
    try:
        backend = _byte_level_backend(meta) if kind == "gpt2" else _sentencepiece_backend(meta)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    vocab = backend.get_vocab()
    types = meta.get("tokenizer.ggml.token_type") or ()
    # control tokens (in the byte alphabet, for byte-level vocabularies) are special, user-defined plain
    alphabet = set(_byte_spelling().values()) if kind == "gpt2" else None
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                                if k == spm.CONTROL and (alphabet is None or set(t) <= alphabet)])
    backend.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types)
                        if k == spm.USER_DEFINED and t in vocab and kind == "gpt2"])
    config = {name: tokens[meta[f"tokenizer.ggml.{key}"]] if f"tokenizer.ggml.{key}" in meta else None
              for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
    # llama.cpp (and transformers) add bos to a SentencePiece vocabulary whose file does not say otherwise
    config["add_bos_token"] = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    config["add_eos_token"] = meta.get("tokenizer.ggml.add_eos_token", False)
    config["additional_special_tokens"] = []
    return backend, config, meta.get("tokenizer.chat_template")
