"""Preference data: rows -> `Pair`s -> token ids -> `[2B, T]` batches.

Sources. A source is a string `LOCATION[::FORMAT]`, the form `--data` takes (several values pool):

- LOCATION is a local `.jsonl`, `.json` (a list of objects, or JSON lines) or `.parquet` file, a local
  folder of such files, or a Hugging Face dataset id `owner/name`. A hub id is fetched with
  `huggingface_hub.snapshot_download(repo_type="dataset")`, data files only (never code). In a folder
  or snapshot, Parquet files are preferred over JSON ones, and when file paths name splits only the
  `split` ones (default `train`) are read. An existing local path wins over a hub id. `capybara`,
  `orca` and `ultrafeedback` are short for the paper's three hub ids.
- FORMAT says how a row becomes a pair. Without it a hub id in `HUB_FORMATS` gets its own adapter and
  everything else `auto`. The formats:
  - `standard`: `prompt`, `chosen`, `rejected` strings (the prompt becomes one user message);
  - `conversational`: `prompt` a message list, `chosen`/`rejected` one assistant message each;
  - `implicit`: `chosen`/`rejected` whole conversations (message lists); the prompt is everything
    but their last (assistant) message, which must be the same in both;
  - `auto`: `standard` or `conversational` when a row has `prompt` (by its type), else `implicit`;
  - `capybara` (argilla/distilabel-capybara-dpo-7k-binarized): `implicit` on `chosen`/`rejected`;
    its `prompt` string column is ignored;
  - `orca` (Intel/orca_dpo_pairs): `system` (may be empty), `question`, `chosen`, `rejected`;
  - `ultrafeedback` (argilla/ultrafeedback-binarized-preferences): `instruction`,
    `chosen_response`, `rejected_response`, `chosen_avg_rating`, `rejected_avg_rating`. Equal
    ratings are counted, and kept unless `drop_ties=True`.
  A message is `{"role": "system"|"user"|"assistant", "content": str}`; a prompt ends with a user turn.

Bad rows are skipped and counted by reason (see `Report`), or raise with `strict=True`. A pair keeps
its `source` (the LOCATION as given, or the hub id), `row` (0-based index within the source,
counted across its files in sorted order) and `where`, the place an editor opens: `file:line`
(1-based; JSON lines count blank lines too) or `file:N` for the N-th row of a Parquet or JSON array,
prefixed by the source's name when the file lies in a folder or hub snapshot. Reports and errors
name pairs by `where`.

Tokens. `tokenize_pairs` renders prompts with the tokenizer's chat template (generation prompt on)
and each response as the template's assistant turn, cut right after its first end-of-turn token.
`collate` pads to `[2B, T]`: chosen rows, then rejected rows. Labels are NOT shifted: the consumer
scores `logits[:, :-1]` against `labels[:, 1:]`.
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from minidpo.logprobs import IGNORE_INDEX

logger = logging.getLogger(__name__)

CAPYBARA = "argilla/distilabel-capybara-dpo-7k-binarized"
ORCA = "Intel/orca_dpo_pairs"
ULTRAFEEDBACK = "argilla/ultrafeedback-binarized-preferences"
HUB_FORMATS = {CAPYBARA: "capybara", ORCA: "orca", ULTRAFEEDBACK: "ultrafeedback"}
SHORT_NAMES = {"capybara": CAPYBARA, "orca": ORCA, "ultrafeedback": ULTRAFEEDBACK}
FORMATS = ("auto", "standard", "conversational", "implicit", "capybara", "orca", "ultrafeedback", "sft")
ROLES = ("system", "user", "assistant")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}

# Why a row or a pair was not used; the keys of `Report.skipped`.
MISSING = "missing field"
WRONG_TYPE = "wrong type"
BAD_ROLE = "bad role"
BAD_JSON = "invalid json"
EMPTY_PROMPT = "empty prompt"
EMPTY_RESPONSE = "empty response"
IDENTICAL = "chosen == rejected"
MISMATCH = "prompt mismatch"
TIE = "equal ratings"
NOT_PREFIX = "prompt tokens not a prefix"
NO_EOT = "no end-of-turn token"
EOT_INSIDE = "end-of-turn token inside response"
PROMPT_TOO_LONG = "prompt does not fit max_length"
IDENTICAL_TOKENS = "chosen == rejected after truncation"
TEMPLATE_ERROR = "chat template refused the messages"
REPLY_CUT = "pairs with a reply cut"  # a note, not a drop: counted by tokenize_pair
CUT_WARNING_SHARE = 0.05  # more pairs than this with a cut reply: tokenize_pairs warns


@dataclass(frozen=True)
class Pair:
    """One preference: a prompt (messages, possibly multi-turn, possibly with a system turn),
    the preferred and the dispreferred assistant reply, and where it came from."""
    prompt: list[dict[str, str]]  # [{"role", "content"}, ...], last role "user"
    chosen: str                   # preferred reply text
    rejected: str                 # dispreferred reply text
    source: str                   # LOCATION of its source, or the hub id
    row: int                      # 0-based row index within that source
    where: str = field(default="", compare=False)  # "file:line" (1-based), for messages


@dataclass(frozen=True)
class TokenizedPair:
    """A pair as token ids: `prompt_ids + chosen_ids` and `prompt_ids + rejected_ids` are the rows."""
    prompt_ids: list[int]    # chat template with the generation prompt (its start cut if too long)
    chosen_ids: list[int]    # reply tokens, ending with the end-of-turn id unless truncated
    rejected_ids: list[int]
    source: str
    row: int
    where: str = field(default="", compare=False)

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)

    @property
    def length(self) -> int:
        """Tokens of the longer of the two rows."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class Report:
    """What came in, what was used, and why the rest was not (first row numbers per reason)."""
    stage: str                                           # "load" or "tokenize"
    seen: int = 0                                        # rows (pairs) that came in
    used: int = 0
    skipped: Counter = field(default_factory=Counter)    # reason -> rows not used
    first: dict = field(default_factory=dict)            # reason -> first `where`s, "file:line" (<= 5)
    notes: Counter = field(default_factory=Counter)      # counted, not dropped (ties, truncation)
    by_source: Counter = field(default_factory=Counter)  # source -> pairs used

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        ids = self.first.setdefault(reason, [])
        if len(ids) < 5:
            ids.append(where)

    def summary(self) -> str:
        """One line: `load: 10 in, 8 used, 2 not used (missing field: 2 [a.jsonl:3, ...])`."""
        reasons = "; ".join(f"{r}: {n} [{', '.join(self.first[r])}]"
                            for r, n in self.skipped.most_common())
        line = f"{self.stage}: {self.seen} in, {self.used} used, {self.seen - self.used} not used"
        line += f" ({reasons})" if reasons else ""
        if self.notes:
            line += "; " + ", ".join(f"{k}: {n}" for k, n in sorted(self.notes.items()))
        return line


class _BadRow(ValueError):
    """A row that cannot become a pair; `reason` is one of the module's reason strings."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def located(pair) -> str:
    """Where a pair came from, for messages: its `where`, else its 1-based row in its source."""
    return pair.where or f"{pair.source} row {pair.row + 1}"


class DroppedPair(ValueError):
    """`tokenize_pair` could not use a pair; `reason` says why, the message names source and row."""

    def __init__(self, reason: str, pair: Pair, detail: str = ""):
        super().__init__(f"{located(pair)}: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Sources and files
# ---------------------------------------------------------------------------------------------

def parse_source(spec: str | Path) -> tuple[str, str | None]:
    """`"LOCATION[::FORMAT]"` -> `(LOCATION, FORMAT or None)`; an unknown FORMAT is a ValueError."""
    location, sep, fmt = str(spec).partition("::")
    if not location:
        raise ValueError(f"data source {spec!r}: empty location")
    if sep and fmt not in FORMATS:
        raise ValueError(f"data source {spec!r}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return location, (fmt if sep else None)


def _locate(location: str, split: str, revision: str | None) -> tuple[list[Path], str, str]:
    """-> (data files, source name, default format) for a local path or a hub dataset id."""
    path = Path(location).expanduser()
    if path.exists():
        if path.is_file() and path.suffix not in DATA_SUFFIXES:
            raise ValueError(f"data source {location!r}: {path.suffix or 'no'} suffix; "
                             f"expected one of {', '.join(DATA_SUFFIXES)}")
        files = [path] if path.is_file() else _data_files(path, split)
        return files, location, "auto"
    repo_id = SHORT_NAMES.get(location, location)
    if not _REPO_ID.match(repo_id) or repo_id.endswith(DATA_SUFFIXES):
        raise FileNotFoundError(f"data source {location!r}: no such file or folder, "
                                f"and not a hub dataset id (owner/name)")
    return _data_files(_download(repo_id, revision), split), repo_id, HUB_FORMATS.get(repo_id, "auto")


def _download(repo_id: str, revision: str | None) -> Path:
    """Fetch a dataset repo's data files (Parquet/JSON only: no loading script is ever run)."""
    import huggingface_hub  # imported here so that nothing touches the network at import

    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, repo_type="dataset", revision=revision,
            allow_patterns=["*.parquet", "*.jsonl", "*.json"])
    except Exception as e:  # offline, unknown repo, gated...: say which source and why
        raise FileNotFoundError(f"data source {repo_id!r} is no local path, and fetching it as a hub "
                                f"dataset failed: {type(e).__name__}: {e}") from e
    return Path(folder)


def _data_files(folder: Path, split: str) -> list[Path]:
    """The data files of a folder: one kind (Parquet first), the `split` ones when paths name splits."""
    def rel(p: Path) -> str:
        return p.relative_to(folder).as_posix()

    # hidden paths hold the hub cache's own files (.cache/huggingface/...), not data
    found = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in DATA_SUFFIXES
             and p.name not in _METADATA_FILES and not re.search(r"(^|/)\.", rel(p))]
    named = re.compile(r"(^|[/_.-])(train|test|validation|valid|dev|eval)([/_.-]|$)")
    wanted = re.compile(rf"(^|[/_.-]){re.escape(split)}([/_.-]|$)")
    for suffix in DATA_SUFFIXES:
        files = [p for p in found if p.suffix == suffix]
        if files:
            if any(named.search(rel(p)) for p in files):
                files = [p for p in files if wanted.search(rel(p))]
            if not files:
                raise FileNotFoundError(f"{folder}: no {suffix} files for split {split!r}")
            return files
    raise FileNotFoundError(f"{folder}: no data files ({', '.join(DATA_SUFFIXES)})")


def _read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(position, row) of one file, in order: the 1-based line of a JSON-lines row, the 1-based
    row number of a Parquet or JSON-array row. An unreadable JSON line yields a `_BadRow`."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow "
                              f"(or minidpo[parquet])") from e
        rows = (row for batch in pq.ParquetFile(path).iter_batches(batch_size=1024) for row in batch.to_pylist())
        yield from enumerate(rows, start=1)
        return
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            rows = None  # not one document: read it as JSON lines below
        if rows is not None:
            if not isinstance(rows, list):
                raise ValueError(f"{path}: a .json data file must hold a list of rows")
            yield from enumerate(rows, start=1)
            return
    yield from _read_json_lines(path)


def _read_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines are not rows (but they count as lines)
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, _BadRow(BAD_JSON, str(e))


# ---------------------------------------------------------------------------------------------
# Rows -> pairs
# ---------------------------------------------------------------------------------------------

def _get(row: Any, key: str, kind: type | tuple) -> Any:
    if not isinstance(row, dict):
        raise _BadRow(WRONG_TYPE, f"row is {type(row).__name__}, not an object")
    if row.get(key) is None:
        raise _BadRow(MISSING, key)
    if not isinstance(row[key], kind):
        raise _BadRow(WRONG_TYPE, f"{key} is {type(row[key]).__name__}")
    return row[key]


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    """Validate a message list and copy it to plain `{"role", "content"}` dicts."""
    if not isinstance(value, list):
        raise _BadRow(WRONG_TYPE, f"{key} is {type(value).__name__}, not a message list")
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise _BadRow(WRONG_TYPE, f"{key}[{i}] is not a {{role, content}} message")
        if m["role"] not in ROLES:
            raise _BadRow(BAD_ROLE, f"{key}[{i}] role {m['role']!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _reply(value: Any, key: str) -> str:
    """A conversational reply: exactly one assistant message."""
    messages = _messages(value, key)
    if len(messages) != 1:
        raise _BadRow(WRONG_TYPE, f"{key} has {len(messages)} messages, expected one assistant reply")
    if messages[0]["role"] != "assistant":
        raise _BadRow(BAD_ROLE, f"{key} reply role {messages[0]['role']!r}")
    return messages[0]["content"]


def _standard(row: Any) -> tuple[list, str, str]:
    prompt = _get(row, "prompt", str)
    return [{"role": "user", "content": prompt}], _get(row, "chosen", str), _get(row, "rejected", str)


def _conversational(row: Any) -> tuple[list, str, str]:
    prompt = _messages(_get(row, "prompt", list), "prompt")
    return prompt, _reply(_get(row, "chosen", list), "chosen"), _reply(_get(row, "rejected", list), "rejected")


def _implicit(row: Any) -> tuple[list, str, str]:
    chosen = _messages(_get(row, "chosen", list), "chosen")
    rejected = _messages(_get(row, "rejected", list), "rejected")
    for key, conv in (("chosen", chosen), ("rejected", rejected)):
        if not conv or conv[-1]["role"] != "assistant":
            raise _BadRow(BAD_ROLE, f"{key} does not end with an assistant reply")
    if chosen[:-1] != rejected[:-1]:
        raise _BadRow(MISMATCH, "chosen[:-1] != rejected[:-1]")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _auto(row: Any) -> tuple[list, str, str]:
    if isinstance(row, dict) and row.get("prompt") is not None:
        return _standard(row) if isinstance(row["prompt"], str) else _conversational(row)
    return _implicit(row)


def _orca(row: Any) -> tuple[list, str, str]:
    system, question = _get(row, "system", str), _get(row, "question", str)
    prompt = ([{"role": "system", "content": system}] if system.strip() else [])
    prompt.append({"role": "user", "content": question})
    return prompt, _get(row, "chosen", str), _get(row, "rejected", str)


def _ultrafeedback(row: Any) -> tuple[list, str, str]:
    prompt = [{"role": "user", "content": _get(row, "instruction", str)}]
    for key in ("chosen_avg_rating", "rejected_avg_rating"):
        if key not in row:
            raise _BadRow(MISSING, key)
    return prompt, _get(row, "chosen_response", str), _get(row, "rejected_response", str)


def _sft(row: Any) -> tuple[list, str, str]:
    """SFT demonstrations `{"messages": [...]}`: the last (assistant) reply is the target; there
    is no rejected reply (the SFT loss reads only the chosen rows)."""
    messages = _messages(_get(row, "messages", list), "messages")
    if not messages or messages[-1]["role"] != "assistant":
        raise _BadRow(BAD_ROLE, "messages do not end with an assistant reply")
    return messages[:-1], messages[-1]["content"], ""


_ADAPTERS = {"sft": _sft, "auto": _auto, "standard": _standard, "conversational": _conversational,
             "implicit": _implicit, "capybara": _implicit, "orca": _orca, "ultrafeedback": _ultrafeedback}


def _check_pair(prompt: list, chosen: str, rejected: str, sft: bool = False) -> None:
    """Checks shared by all formats, after the row's own shape was accepted."""
    if not prompt or not any(m["content"].strip() for m in prompt):
        raise _BadRow(EMPTY_PROMPT)
    if prompt[-1]["role"] != "user":
        raise _BadRow(BAD_ROLE, f"prompt ends with a {prompt[-1]['role']!r} turn, not 'user'")
    if not chosen.strip() or (not sft and not rejected.strip()):
        raise _BadRow(EMPTY_RESPONSE, "chosen" if not chosen.strip() else "rejected")
    if chosen == rejected:
        raise _BadRow(IDENTICAL)


def _rating_tie(row: dict) -> bool | None:
    """Ultrafeedback: whether the two average ratings are equal; None when one is missing/NaN."""
    ratings = [row["chosen_avg_rating"], row["rejected_avg_rating"]]
    for r in ratings:
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float))):
            raise _BadRow(WRONG_TYPE, f"rating {r!r}")
    if any(r is None or math.isnan(r) for r in ratings):
        return None
    return ratings[0] == ratings[1]


def row_to_pair(row: Any, fmt: str, source: str, index: int, *, drop_ties: bool = False,
                report: Report | None = None, where: str = "") -> Pair:
    """Turn one row into a `Pair` with format `fmt`; raises `ValueError` (with a `.reason`) if unusable."""
    if fmt not in _ADAPTERS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if isinstance(row, _BadRow):
        raise row
    prompt, chosen, rejected = _ADAPTERS[fmt](row)
    _check_pair(prompt, chosen, rejected, sft=fmt == "sft")
    if fmt == "ultrafeedback":
        tie = _rating_tie(row)
        if report is not None and tie is not False:
            report.notes["ratings missing" if tie is None else "equal ratings"] += 1
        if tie and drop_ties:
            raise _BadRow(TIE)
    return Pair(prompt, chosen, rejected, source, index, where)


def _file_name(path: Path, location: str, name: str) -> str:
    """How messages name a data file: the source as given when it is the file itself, else its
    path inside the source's folder (a hub snapshot's files by name, after the repo id)."""
    local = Path(location).expanduser()
    if path == local:
        return location
    if local.is_dir():
        return str(Path(location) / path.relative_to(local))
    return f"{name}/{path.name}"


def load_pairs(sources: str | Path | Iterable[str | Path], *, strict: bool = False,
               drop_ties: bool = False, split: str = "train",
               revision: str | None = None) -> tuple[list[Pair], Report]:
    """Read and pool sources (see the module docstring for `LOCATION[::FORMAT]`) into `Pair`s.

    Bad rows are skipped and counted by reason in the returned `Report` (whose one-line summary is
    logged at INFO); with `strict=True` the first bad row raises `ValueError` naming its file and line.
    `drop_ties` drops ultrafeedback pairs whose average ratings are equal (counted either way).
    """
    specs = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not specs:
        raise ValueError("load_pairs: no data sources given")
    pairs, report = [], Report("load")
    for spec in specs:
        location, fmt = parse_source(spec)
        files, name, default_fmt = _locate(location, split, revision)
        fmt = fmt or default_fmt
        index = 0
        for path in files:
            for position, row in _read_rows(path):
                report.seen += 1
                where = f"{_file_name(path, location, name)}:{position}"
                try:
                    pair = row_to_pair(row, fmt, name, index, drop_ties=drop_ties, report=report, where=where)
                except _BadRow as e:
                    if strict:
                        raise ValueError(f"{where}: {e}") from e
                    report.skip(e.reason, where)
                else:
                    pairs.append(pair)
                    report.used += 1
                    report.by_source[name] += 1
                index += 1
    logger.info(report.summary())
    return pairs, report


# ---------------------------------------------------------------------------------------------
# Nested subsets
# ---------------------------------------------------------------------------------------------

def subset(pairs: Sequence[Pair], fraction: float, seed: int) -> tuple[list[Pair], Counter]:
    """The first `round(fraction * n)` pairs of one seeded permutation, in their original order.

    For one seed the subsets are nested (a smaller fraction's lies inside a larger one's), whatever
    the fractions. Returns `(pairs, composition)` with composition a `Counter` source -> pairs.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)  # one permutation per seed: this is what makes them nested
    k = round(fraction * len(pairs))
    if k == 0 and pairs:
        raise ValueError(f"fraction {fraction} of {len(pairs)} pairs selects none")
    chosen = [pairs[i] for i in sorted(order[:k])]
    return chosen, Counter(p.source for p in chosen)


# ---------------------------------------------------------------------------------------------
# Pairs -> token ids
# ---------------------------------------------------------------------------------------------

def _template_ids(tokenizer: Any, pair: Pair, messages: list, add_generation_prompt: bool) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    except ValueError as e:  # e.g. a template that raises on a system turn or on roles out of order
        raise DroppedPair(TEMPLATE_ERROR, pair, str(e)) from e
    return [int(t) for t in ids]


def _reply_ids(pair: Pair, reply: str, prompt_ids: list[int], tokenizer: Any) -> list[int]:
    """The reply's tokens: the full conversation's tokens after the prompt's, through the first
    end-of-turn (what a template adds after it, e.g. ChatML's newline, is not trained on)."""
    messages = pair.prompt + [{"role": "assistant", "content": reply}]
    full = _template_ids(tokenizer, pair, messages, add_generation_prompt=False)
    if full[:len(prompt_ids)] != prompt_ids:
        raise DroppedPair(NOT_PREFIX, pair)
    tail, eot = full[len(prompt_ids):], tokenizer.eot_id
    if eot not in tail:
        raise DroppedPair(NO_EOT, pair, f"id {eot}")
    end = tail.index(eot) + 1
    if eot in tail[end:]:  # the reply's text holds the end-of-turn marker: it would be cut silently
        raise DroppedPair(EOT_INSIDE, pair)
    return tail[:end]


def tokenize_pair(pair: Pair, tokenizer: Any, *, max_length: int, max_prompt_length: int | None = None,
                  notes: Counter | None = None) -> TokenizedPair:
    """Token ids of one pair, truncated to fit; raises `DroppedPair` (a ValueError) if it cannot be used.

    `tokenizer` needs `apply_chat_template(messages, add_generation_prompt=..., tokenize=True) ->
    list[int]` and `eot_id`. Truncation: the prompt keeps its last `max_prompt_length` tokens, then
    each reply is cut to `max_length - len(prompt)` (a cut reply has no end-of-turn token). A pair
    whose (cut) prompt leaves no room for a reply token is dropped. Cuts are counted in `notes`.
    """
    if max_length < 2 or (max_prompt_length is not None and max_prompt_length < 1):
        raise ValueError(f"max_length {max_length} / max_prompt_length {max_prompt_length} too small")
    notes = Counter() if notes is None else notes
    prompt_ids = _template_ids(tokenizer, pair, pair.prompt, add_generation_prompt=True)
    chosen = _reply_ids(pair, pair.chosen, prompt_ids, tokenizer)
    rejected = _reply_ids(pair, pair.rejected, prompt_ids, tokenizer)
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]  # keep the end: the question and the turn header
        notes["prompt truncated"] += 1
    room = max_length - len(prompt_ids)
    if room < 1:
        raise DroppedPair(PROMPT_TOO_LONG, pair, f"{len(prompt_ids)} prompt tokens, max_length {max_length}")
    if chosen[:room] == rejected[:room]:
        raise DroppedPair(IDENTICAL_TOKENS, pair)
    for name, ids in (("chosen", chosen), ("rejected", rejected)):
        if len(ids) > room:
            notes[f"{name} truncated"] += 1
    if max(len(chosen), len(rejected)) > room:
        notes[REPLY_CUT] += 1
    chosen, rejected = chosen[:room], rejected[:room]
    return TokenizedPair(prompt_ids, chosen, rejected, pair.source, pair.row, pair.where)


def tokenize_pairs(pairs: Iterable[Pair], tokenizer: Any, *, max_length: int,
                   max_prompt_length: int | None = None,
                   strict: bool = False) -> tuple[list[TokenizedPair], Report]:
    """`tokenize_pair` over many pairs; dropped pairs are counted by reason (or raise if `strict`).
    The report's summary (with truncation counts) is logged at INFO."""
    out, report = [], Report("tokenize")
    for pair in pairs:
        report.seen += 1
        try:
            tp = tokenize_pair(pair, tokenizer, max_length=max_length,
                               max_prompt_length=max_prompt_length, notes=report.notes)
        except DroppedPair as e:
            if strict:
                raise
            report.skip(e.reason, located(pair))
            continue
        out.append(tp)
        report.used += 1
        report.by_source[pair.source] += 1
    report.notes = +report.notes  # drop zero counts
    logger.info(report.summary())
    cut = report.notes[REPLY_CUT]
    if report.used and cut > CUT_WARNING_SHARE * report.used:
        logger.warning("%d of %d pairs (%.0f%%) lose the end of a reply to max_length=%d: they train on "
                       "replies cut before their end-of-turn token. Raise max_length (--max-length) or "
                       "shorten the data.", cut, report.used, 100 * cut / report.used, max_length)
    return out, report


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

def collate(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad B pairs into one batch, right padding, chosen rows first then rejected rows.

    Returns `input_ids`, `attention_mask`, `labels`: `[2B, T]` int64, T the longest row;
    `labels` is -100 on prompt and padding and equals `input_ids` on reply tokens, NOT shifted
    (score `logits[:, :-1]` against `labels[:, 1:]`); `prompt_lengths`: `[B]` int64 (the same for a
    pair's two rows, so its prompt may be shared).
    """
    if not pairs:
        raise ValueError("collate: no pairs")
    if pad_id is None:
        raise ValueError("collate: pad_id is None (the tokenizer has no pad token)")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, reply) in enumerate(rows):
        n, m = len(prompt), len(reply)
        input_ids[i, :n + m] = torch.tensor(prompt + reply, dtype=torch.long)
        labels[i, n:n + m] = torch.tensor(reply, dtype=torch.long)
        attention_mask[i, :n + m] = 1
    prompt_lengths = torch.tensor([p.prompt_length for p in pairs], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "prompt_lengths": prompt_lengths}


def padding_share(pairs: Sequence[TokenizedPair], order: Sequence[Sequence[int]]) -> float:
    """Share of pad positions in the `[2B, T]` batches that `order` (lists of indices) makes."""
    real = total = 0
    for batch in order:
        rows = [len(pairs[i].prompt_ids) + len(r) for i in batch
                for r in (pairs[i].chosen_ids, pairs[i].rejected_ids)]
        real += sum(rows)
        total += len(rows) * max(rows)
    return 1.0 - real / total if total else 0.0


def batches(pairs: Sequence[TokenizedPair], batch_size: int, *, seed: int,
            group_by_length: bool = False, drop_last: bool = False,
            group_size: int = 64) -> list[list[int]]:
    """One epoch's batches as lists of indices into `pairs`, shuffled with `seed` (use a new seed,
    e.g. `seed + epoch`, per epoch).

    With `group_by_length`, each run of `batch_size * group_size` shuffled pairs is sorted by length
    before being cut into batches, and the batches are shuffled: similar lengths share a batch, so
    less padding. The padding share is logged at INFO. `drop_last` drops a short last batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    if group_by_length:
        chunk = batch_size * group_size
        order = [i for s in range(0, len(order), chunk)
                 for i in sorted(order[s:s + chunk], key=lambda i: -pairs[i].length)]
    out = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if drop_last and out and len(out[-1]) < batch_size:
        out.pop()
    if group_by_length:
        rng.shuffle(out)  # else every epoch would start with its longest batches
    logger.info("batches: %d of up to %d pairs, padding share %.3f%s", len(out), batch_size,
                padding_share(pairs, out), " (grouped by length)" if group_by_length else "")
    return out
