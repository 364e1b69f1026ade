"""Read and write Hugging Face model folders: `config.json` plus safetensors, sharded or not, of
Mistral, Llama and Qwen2 (each saved back as its own architecture); `.gguf` files go to `minidpo.gguf`.

Loading builds the network on the meta device and reads each tensor straight from its file into
a tensor of the target dtype and device, so peak host memory stays near the model's size (no mmap
of whole shards, no fp32 detour). Only safetensors are ever read: pickled `.bin` files can run code.
"""
import json
import os
import struct
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file

from minidpo import quant
from minidpo.files import write_json
from minidpo.model import Mistral, MistralConfig

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# What a hub download may fetch: weights as safetensors, json configs, tokenizer files. Never *.bin.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.jinja"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def repo_id(name) -> str:
    """`name` (not a local folder) as a hub repo id `owner/name`; FileNotFoundError if it is not one."""
    name = str(name)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name} is neither a local folder nor a hub repo id (owner/name)")
    return name


def download_folder(path_or_repo_id: Union[str, Path], allow_patterns=HUB_PATTERNS) -> Path:
    """A local folder as is, or a hub repo id fetched through `huggingface_hub` (cache first)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = repo_id(path_or_repo_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=list(allow_patterns)))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"cannot fetch {name}: the hub is not reachable (offline?) and the repo is not in the "
            f"local cache. Download it on a connected machine or pass a local folder.") from e
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"cannot fetch {name} from the hub: {e}") from e


def _read_header(file: Path):
    """Parse a safetensors header: (entries, data_start). Checks every offset against the file size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file} is truncated: no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{file} is truncated or corrupt: header of {n} bytes in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is corrupt: its safetensors header is not JSON ({e})") from e
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, e in header.items():
        begin, end = e["data_offsets"]
        if e["dtype"] not in _DTYPES:
            raise ValueError(f"{file}: tensor {name} has unsupported dtype {e['dtype']}")
        numel = 1
        for s in e["shape"]:
            numel *= s
        if end > data_size or end - begin != numel * _DTYPES[e["dtype"]].itemsize:
            raise ValueError(f"{file} is truncated or corrupt: tensor {name} lies outside the file")
    return header, 8 + n


def read_safetensors(file: Path, *, dtype=None, device="cpu", names=None, chunk_bytes=1 << 24):
    """Yield (name, tensor) from one safetensors file, read straight into a tensor of `dtype`.

    A tensor stored in another dtype goes through one reused `chunk_bytes` buffer, so converting
    (say fp32 file -> bf16 model) never holds a full-size temporary.
    """
    header, start = _read_header(file)
    buffer = None
    with open(file, "rb") as f:
        for name, e in header.items():
            if names is not None and name not in names:
                continue
            stored = _DTYPES[e["dtype"]]
            target = dtype if dtype is not None and stored.is_floating_point else stored
            out = torch.empty(e["shape"], dtype=target)
            f.seek(start + e["data_offsets"][0])
            if target == stored:
                if out.numel():
                    f.readinto(out.view(-1).view(torch.uint8).numpy())
            else:
                per_chunk = max(1, chunk_bytes // stored.itemsize)
                if buffer is None or buffer.dtype != stored:
                    buffer = torch.empty(per_chunk, dtype=stored)
                flat = out.view(-1)
                for i in range(0, flat.numel(), per_chunk):
                    n = min(per_chunk, flat.numel() - i)
                    f.readinto(buffer[:n].view(torch.uint8).numpy())
                    flat[i:i + n].copy_(buffer[:n])
            yield name, out.to(device)


def _shard_files(folder: Path):
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {folder}: {missing}")
        return [folder / f for f in files]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    bins = [p.name for p in folder.glob("*.bin")]
    extra = f" (it has {bins}: minidpo loads only safetensors)" if bins else ""
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {folder}{extra}")


def load_model(path_or_repo_id, *, dtype: Optional[torch.dtype] = None, device="cpu", quantize=None) -> Mistral:
    """Hugging Face folder (Mistral, Llama or Qwen2), hub repo id or `.gguf` file -> `Mistral`, strict.

    `dtype=None` keeps the checkpoint's (fp32 for GGUF, whose quantized tensors dequantize to it).
    `quantize="nf4"`: every Linear but the head is stored in 4-bit NF4 with double quantization
    (QLoRA's base, see minidpo.quant), each weight quantized as soon as it is read, so host memory
    peaks near the quantized model's size; embeddings, norms and the head stay in `dtype`, the compute
    dtype. A folder bitsandbytes quantized to 4-bit NF4 (`*-bnb-4bit`) loads as such, whatever `quantize`.
    """
    from minidpo import gguf

    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize={quantize!r}; choose None or 'nf4'")
    if gguf.is_gguf(path_or_repo_id):
        return gguf.load_gguf_model(path_or_repo_id, dtype=dtype, device=device, quantize=quantize)
    folder = download_folder(path_or_repo_id)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    config = MistralConfig.from_json(folder / "config.json")
    prequantized = quant.bnb_4bit(folder)
    if dtype is None:
        dtype = getattr(torch, config.torch_dtype) if config.torch_dtype else torch.float32
    shards = (_read_shard(file, dtype, device, prequantized) for file in _shard_files(folder))
    model = fill_model(config, shards, folder, quantize=quantize, prequantized=prequantized)
    config.torch_dtype = str(dtype).removeprefix("torch.")
    return model


def fill_model(config: MistralConfig, shards, where, *, quantize=None, prequantized=False) -> Mistral:
    """A `Mistral(config)` built on the meta device and filled from `shards` (iterables of (name,
    tensor), read one at a time); every tensor must fit, by name and shape. `quantize="nf4"` stores
    each Linear weight but the head in NF4 as it arrives; `prequantized`: the shards hold
    bitsandbytes' 4-bit tensors."""
    with torch.device("meta"):
        model = Mistral(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # HF stores tied weights once, as the embedding
    seen, unexpected, misshapen = set(), [], []
    targets = set(quant.quantizable(model)) if quantize or prequantized else set()
    bnb_parts = {}  # a bitsandbytes weight's tensors, gathered until all of them are read
    for tensors in shards:
        shard = {}
        for name, t in tensors:
            base, part = quant.split_bnb_name(name, targets) if prequantized else (None, None)
            if base is not None and (part or t.dtype == torch.uint8):  # (a skipped module stays dense)
                bnb_parts.setdefault(base, {})[part] = t
            elif name in targets and not prequantized:
                quant.install(model, name, quant.quantize_nf4(t, double_quant=True))
                del t
                quant.release_freed_memory()
                seen.add(name)
            elif name not in expected:
                unexpected.append(name)
            elif tuple(t.shape) != expected[name]:
                misshapen.append(f"{name}: file {tuple(t.shape)} vs model {expected[name]}")
            else:
                shard[name] = t
                seen.add(name)
        model.load_state_dict(shard, strict=False, assign=True)
    for name, parts in bnb_parts.items():
        quant.install(model, name, quant.from_bnb(name, parts))
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing or unexpected or misshapen:
        raise ValueError(f"checkpoint {where} does not fit the config: missing {missing}, "
                         f"unexpected {sorted(unexpected)}, misshapen {misshapen}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _read_shard(file: Path, dtype, device, prequantized: bool):
    """read_safetensors, except that a bitsandbytes folder's uint8 codes and fp32 statistics keep
    their dtype (only the full-precision tensors become `dtype`)."""
    if not prequantized:
        yield from read_safetensors(file, dtype=dtype, device=device)
        return
    for name, t in read_safetensors(file, device=device):
        stats = t.dtype == torch.uint8 or name.rsplit(".", 1)[-1] in quant.BNB_PARTS
        yield name, t if stats or not t.is_floating_point() else t.to(dtype)


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda u: -len(u[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def save_model(model: Mistral, directory, max_shard_size: Union[int, str] = "5GB", *, state_dict=None):
    """Write `config.json` and safetensors (sharded past `max_shard_size`) that transformers loads.

    `state_dict`: the tensors to write instead of `model.state_dict()` (e.g. gathered from FSDP shards);
    `model` then gives only the config."""
    if quant.is_quantized(model):
        raise ValueError("save_model: this model's base is 4-bit NF4; save its adapters with save_lora, or "
                         "load the full-precision base (load_model without quantize), load_lora and "
                         "merge_lora to save a full model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state_dict is None else dict(state_dict)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    limit, shards, current, size = _parse_size(max_shard_size), [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(current)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(directory / (name + ".tmp")), metadata={"format": "pt"})
        os.replace(directory / (name + ".tmp"), directory / name)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {k: n for n, s in zip(names, shards) for k in s}
        write_json(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map},
                   sort_keys=True)
    config = model.config.to_hf_dict()
    config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    write_json(directory / "config.json", config, sort_keys=True)
    return directory
