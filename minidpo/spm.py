"""SentencePiece `tokenizer.model` -> `tokenizers.Tokenizer`, without protobuf or sentencepiece.

A `tokenizer.model` is one serialized `sentencepiece.ModelProto` (proto2). We read the few fields that
decide how text becomes ids (field numbers from sentencepiece's `sentencepiece_model.proto`):

    ModelProto      1 pieces (repeated SentencePiece)   2 trainer_spec   3 normalizer_spec
    SentencePiece   1 piece (string)   2 score (float)   3 type (enum, default NORMAL)
    TrainerSpec     3 model_type (1 UNIGRAM, 2 BPE)   24 treat_whitespace_as_suffix   35 byte_fallback
                    40 unk_id   41 bos_id   42 eos_id   43 pad_id
    NormalizerSpec  1 name   2 precompiled_charsmap   3 add_dummy_prefix   4 remove_extra_whitespaces
                    5 escape_whitespaces

and rebuild a SentencePiece BPE model as a `tokenizers` BPE (the same construction transformers uses
for Llama and Mistral):

* vocabulary: every piece at its own id;
* merges: every way to split a piece into two pieces, ranked by the merged piece's score (highest
  first). SentencePiece's BPE merges the adjacent pair whose union has the highest score, so ranking
  merges by that score makes the two agree;
* byte fallback: characters outside the vocabulary become `<0xXX>` byte pieces;
* normalizer (SentencePiece normalizes each span between added tokens on its own, like the "legacy"
  Llama tokenizer Mistral-7B v0.1 and OpenHermes were trained with): the charsmap, extra-whitespace
  removal, a `▁` prepended to every span (`add_dummy_prefix`), spaces written as `▁`;
* decoder: `▁` back to spaces, byte pieces back to UTF-8, the dummy prefix's space stripped.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

# SentencePiece.Type values (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
SPACE = "\u2581"  # "▁", SentencePiece's visible space


@dataclass
class Piece:
    piece: str    # the piece's text, spaces written as "▁"; byte pieces are "<0xXX>"
    score: float  # BPE: higher merges earlier
    type: int     # NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED or BYTE


@dataclass
class SentencePieceModel:
    """The parts of a `ModelProto` that decide encoding; defaults are the proto's defaults."""
    pieces: list[Piece] = field(default_factory=list)
    model_type: int = 1                     # TrainerSpec.model_type: 1 unigram, 2 bpe
    byte_fallback: bool = False             # unknown characters -> <0xXX> pieces
    treat_whitespace_as_suffix: bool = False
    unk_id: int = 0
    bos_id: int = 1                         # -1 when the model has none
    eos_id: int = 2
    pad_id: int = -1
    normalizer_name: str = ""               # "identity", "nmt_nfkc", ... (informative only)
    precompiled_charsmap: bytes = b""       # the compiled normalization rules; empty = identity
    add_dummy_prefix: bool = True           # prepend "▁" to the text
    remove_extra_whitespaces: bool = True   # strip and collapse runs of spaces
    escape_whitespaces: bool = True         # write " " as "▁"

    def piece_at(self, index: int) -> str | None:
        """The piece text at `index`, or None for an id of -1 (disabled) or out of range."""
        return self.pieces[index].piece if 0 <= index < len(self.pieces) else None


# ---------------------------------------------------------------------------------------------------
# protobuf wire format: (field number << 3 | wire type) keys, varints, fixed32/64, length-delimited.

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: bytes):
    """Yield (field_number, wire_type, value): ints for varints, bytes for everything else."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire} for field {number}")
        if pos > len(buf):
            raise ValueError(f"field {number} runs past the end of its message")
        yield number, wire, value


def _int32(value: int) -> int:
    """proto int32 is sent as a 64-bit two's-complement varint: -1 arrives as 2**64 - 1."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _float(value: bytes) -> float:
    return struct.unpack("<f", value)[0]


def _parse_piece(buf: bytes) -> Piece:
    piece, score, kind = "", 0.0, NORMAL
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 2:
            piece = value.decode("utf-8")
        elif number == 2 and wire == 5:
            score = _float(value)
        elif number == 3 and wire == 0:
            kind = value
    return Piece(piece, score, kind)


# field number -> (attribute, converter) for the scalar fields we keep
_TRAINER_FIELDS = {3: ("model_type", int), 24: ("treat_whitespace_as_suffix", bool),
                   35: ("byte_fallback", bool), 40: ("unk_id", _int32), 41: ("bos_id", _int32),
                   42: ("eos_id", _int32), 43: ("pad_id", _int32)}
_NORMALIZER_FIELDS = {1: ("normalizer_name", lambda b: b.decode("utf-8")),
                      2: ("precompiled_charsmap", bytes), 3: ("add_dummy_prefix", bool),
                      4: ("remove_extra_whitespaces", bool), 5: ("escape_whitespaces", bool)}


def _parse_spec(buf: bytes, model: SentencePieceModel, known: dict) -> None:
    for number, _, value in _fields(buf):
        if number in known:
            name, convert = known[number]
            setattr(model, name, convert(value))


def parse_model_proto(data: bytes) -> SentencePieceModel:
    """Decode a serialized `sentencepiece.ModelProto` (the bytes of a `tokenizer.model`)."""
    model = SentencePieceModel()
    for number, wire, value in _fields(data):
        if wire != 2:
            continue
        if number == 1:
            model.pieces.append(_parse_piece(value))
        elif number == 2:
            _parse_spec(value, model, _TRAINER_FIELDS)
        elif number == 3:
            _parse_spec(value, model, _NORMALIZER_FIELDS)
    if not model.pieces:
        raise ValueError("no pieces found: not a SentencePiece model")
    return model


def read_sentencepiece(path: str | Path) -> SentencePieceModel:
    """Read and parse a `tokenizer.model` file; errors name the file."""
    path = Path(path)
    try:
        return parse_model_proto(path.read_bytes())
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"{path}: cannot read as a SentencePiece model: {e}") from e


# ---------------------------------------------------------------------------------------------------
# conversion

def bpe_merges(model: SentencePieceModel) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a piece, best merged score first.

    Only NORMAL pieces take part: SentencePiece never builds control, byte or unknown pieces by
    merging. Ties (Mistral gives all 15 whitespace-only pieces the score -1e9) are broken by the
    merged piece's id, then the parts' ids. SentencePiece breaks them leftmost-first instead, which
    no fixed ranking can copy in general; on runs of spaces both reach the same pieces (the
    corpus test compares runs of 1 to 40 spaces and tabs).
    """
    ids = {p.piece: i for i, p in enumerate(model.pieces) if p.type == NORMAL}
    ranked = []
    for piece, index in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-model.pieces[index].score, index, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _normalizer(model: SentencePieceModel) -> normalizers.Normalizer | None:
    """SentencePiece's normalization steps, in its order."""
    steps = []
    if model.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if model.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))  # Prepend leaves an empty span empty, as SentencePiece does
    if model.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps) if steps else None


def _decoder(model: SentencePieceModel) -> decoders.Decoder:
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if model.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # after Fuse, so only the text's first space goes
    return decoders.Sequence(steps)


def _check_supported(model: SentencePieceModel) -> None:
    if model.model_type != 2:
        kind = MODEL_TYPES.get(model.model_type, str(model.model_type))
        raise ValueError(f"only BPE SentencePiece models can be converted, this one is {kind!r}")
    if model.treat_whitespace_as_suffix:
        raise ValueError("SentencePiece models with treat_whitespace_as_suffix=true are not supported")
    for kind, label in ((UNUSED, "UNUSED"), (USER_DEFINED, "user-defined")):
        # SentencePiece matches user-defined pieces inside the normalized text, which an added token
        # cannot do here (it would be matched per span, before the "▁" prefix), so refuse, not guess
        found = [p.piece for p in model.pieces if p.type == kind]
        if found:
            raise ValueError(f"SentencePiece models with {label} pieces are not supported "
                             f"({len(found)}, e.g. {found[0]!r}); provide a tokenizer.json instead")


def special_pieces(model: SentencePieceModel) -> list[str]:
    """Unknown and control pieces (`<unk>`, `<s>`, `</s>`): matched whole in text, like transformers."""
    return [p.piece for p in model.pieces if p.type in (UNKNOWN, CONTROL)]


def to_tokenizers(model: SentencePieceModel, *, add_bos: bool = True, add_eos: bool = False) -> Tokenizer:
    """Build the `tokenizers.Tokenizer` equivalent of a SentencePiece BPE model.

    `add_bos`/`add_eos` set the post-processor used by `encode(..., add_special_tokens=True)`
    (SentencePiece itself adds nothing unless asked; Llama/Mistral add `<s>`).
    Added tokens beyond the model (e.g. `<|im_start|>`) are the caller's to add.
    """
    _check_supported(model)
    vocab = {p.piece: i for i, p in enumerate(model.pieces)}
    if len(vocab) != len(model.pieces):
        raise ValueError("SentencePiece model has duplicate pieces")
    unk = model.piece_at(model.unk_id)
    tok = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(model), unk_token=unk, fuse_unk=True,
                        byte_fallback=model.byte_fallback))
    tok.normalizer = _normalizer(model)
    tok.decoder = _decoder(model)
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in special_pieces(model)])
    tok.post_processor = bos_eos_processor(tok, model.piece_at(model.bos_id) if add_bos else None,
                                           model.piece_at(model.eos_id) if add_eos else None)
    return tok


def bos_eos_processor(tok: Tokenizer, bos: str | None, eos: str | None) -> processors.PostProcessor:
    """A post-processor that wraps each sequence as `bos $A eos` (either may be None)."""
    def wrap(sequence: str, type_id: int) -> str:
        parts = [f"{bos}:{type_id}"] if bos is not None else []
        parts.append(f"{sequence}:{type_id}")
        return " ".join(parts + ([f"{eos}:{type_id}"] if eos is not None else []))

    specials = [(t, _required_id(tok, t)) for t in dict.fromkeys([bos, eos]) if t is not None]
    return processors.TemplateProcessing(single=wrap("$A", 0), pair=f"{wrap('$A', 0)} {wrap('$B', 1)}",
                                         special_tokens=specials)


def _required_id(tok: Tokenizer, token: str) -> int:
    index = tok.token_to_id(token)
    if index is None:
        raise ValueError(f"special token {token!r} is not in the vocabulary")
    return index
