"""Reference log-probs computed once and kept on disk, for `--reference precomputed`.

The values depend on the base weights, the tokenisation and how log-probs are reduced, so they live
in one folder per *key* naming exactly that:

    weights         digest of the model folder's config.json and, per safetensors file (or the one
                    .gguf file), its name, size, header and 256 blocks of 4 KiB sampled evenly across
                    its data (a different checkpoint of the same shapes, e.g. an SFT warm start, gets
                    another digest without reading 14 GB)
    tokenizer       digest of the tokenizer files plus the chat template's source
    max_length, max_prompt_length, average (IPO's per-token mean), dtype, device type

Inside a key's folder values are stored per pair, under a digest of the pair's token ids, so any
subset of the data (a sweep over nested fractions) reuses what earlier runs computed: each pair's
reference is computed once. Layout:

    ROOT/<key digest>/key.json                 the key; checked on every read
    ROOT/<key digest>/refs-<uuid>.safetensors  `digests` uint8 [N, 16], `logps` fp32 [N, 2]
                                               (chosen, rejected); written to a temporary name and
                                               renamed, so a reader never sees half a file
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from minidpo.data import TokenizedPair
from minidpo.tokenizer import TOKENIZER_FILES

SAMPLES_PER_FILE = 256  # sampled blocks per weights file in the weights digest
SAMPLE_BYTES = 4096
DIGEST_BYTES = 16


def default_root() -> Path:
    """$MINIDPO_CACHE/reference, or ~/.cache/minidpo/reference."""
    base = os.environ.get("MINIDPO_CACHE") or Path.home() / ".cache" / "minidpo"
    return Path(base) / "reference"


def _file_digest(h, path: Path) -> None:
    """Feed one weights file's identity into `h`: name, size, header (safetensors) and sampled data
    blocks (a GGUF file is sampled whole: its metadata lies in the first block)."""
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        start, span = 0, size
        if path.suffix == ".safetensors":
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path} is truncated: no safetensors header")
            (n,) = struct.unpack("<Q", head)
            h.update(f.read(n))
            start, span = 8 + n, max(0, size - 8 - n)
        for i in range(SAMPLES_PER_FILE):
            f.seek(start + span * i // SAMPLES_PER_FILE)
            h.update(f.read(SAMPLE_BYTES))


def weights_digest(folder: Path) -> str:
    """Hex digest identifying a model folder's weights (see the module docstring)."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(folder.glob("*.safetensors"))  # a .gguf file
    if not files:
        raise FileNotFoundError(f"{folder} holds no safetensors files to identify the weights by")
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    config = folder / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for path in files:
        _file_digest(h, path)
    return h.hexdigest()


def tokenizer_digest(folder: Path, chat_template: str | None) -> str:
    """Hex digest of the tokenizer files in `folder` and the chat template in use."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    if Path(folder).is_file():  # a .gguf file holds its tokenizer
        _file_digest(h, Path(folder))
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update((chat_template or "").encode())
    return h.hexdigest()


def pair_digest(pair: TokenizedPair) -> bytes:
    """16-byte digest of a pair's token ids (prompt, chosen, rejected, with their lengths)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
        h.update(struct.pack(f"<I{len(ids)}i", len(ids), *ids))
    return h.digest()


class ReferenceCache:
    """Per-pair reference log-probs under one key (a dict of JSON values) below `root`."""

    def __init__(self, root, key: dict):
        self.key = json.loads(json.dumps(key, sort_keys=True))  # as it reads back from key.json
        digest = hashlib.blake2b(json.dumps(self.key, sort_keys=True).encode(), digest_size=DIGEST_BYTES)
        self.folder = Path(root) / digest.hexdigest()

    def _check_key(self) -> None:
        file = self.folder / "key.json"
        try:
            stored = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"reference cache {file} is unreadable ({e}); delete {self.folder}") from e
        if stored != self.key:
            raise ValueError(f"reference cache {file} holds key {stored}, expected {self.key}; "
                             f"delete {self.folder}")

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("refs-*.safetensors"))

    def load(self) -> dict[bytes, tuple[float, float]]:
        """Every stored pair digest -> (chosen, rejected) log-prob."""
        if not self.folder.is_dir():
            return {}
        self._check_key()
        values = {}
        for shard in self.shards():
            t = load_file(str(shard))
            digests, logps = t["digests"], t["logps"]
            if digests.shape[0] != logps.shape[0] or digests.shape[1:] != (DIGEST_BYTES,):
                raise ValueError(f"reference cache shard {shard} is malformed; delete it")
            for d, v in zip(digests.numpy(), logps.tolist()):
                values[d.tobytes()] = (v[0], v[1])
        return values

    def lookup(self, pairs: Sequence[TokenizedPair]) -> tuple[torch.Tensor, list[int]]:
        """-> (fp32 [N, 2] with NaN where unknown, indices of the pairs not in the cache)."""
        stored = self.load()
        table = torch.full((len(pairs), 2), float("nan"))
        missing = []
        for i, pair in enumerate(pairs):
            value = stored.get(pair_digest(pair))
            if value is None:
                missing.append(i)
            else:
                table[i] = torch.tensor(value)
        return table, missing

    def store(self, pairs: Sequence[TokenizedPair], logps: torch.Tensor) -> Path:
        """Add the values of `pairs` (fp32 [N, 2]: chosen, rejected) as one new shard."""
        if logps.shape != (len(pairs), 2):
            raise ValueError(f"logps has shape {tuple(logps.shape)}, expected {(len(pairs), 2)}")
        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        if key_file.is_file():
            self._check_key()
        else:
            tmp = self.folder / f"key.json.{uuid.uuid4().hex}.tmp"
            tmp.write_text(json.dumps(self.key, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, key_file)
        digests = torch.tensor([list(pair_digest(p)) for p in pairs], dtype=torch.uint8)
        name = f"refs-{uuid.uuid4().hex}.safetensors"
        tmp = self.folder / (name + ".tmp")
        save_file({"digests": digests.reshape(-1, DIGEST_BYTES), "logps": logps.float().cpu().contiguous()},
                  str(tmp))
        os.replace(tmp, self.folder / name)
        return self.folder / name
