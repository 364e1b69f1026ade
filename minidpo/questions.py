"""Questions in MT-Bench's format and answers in FastChat's, read from JSONL and checked line by line.

A question file has one JSON object a line::

    {"question_id": 81, "category": "writing", "turns": ["first question", "follow-up"],
     "reference": ["reference answer to turn 1", "... to turn 2"]}        # reference optional

`"turns"` may also be spelled `"prompt"` (the hub copy `HuggingFaceH4/mt_bench_prompts` renamed it).
An answer file (FastChat's `gen_model_answer.py` output, and ours from `python -m minidpo generate`)::

    {"question_id": 81, "answer_id": "...", "model_id": "base", "tstamp": 1.7e9,
     "choices": [{"index": 0, "turns": ["answer to turn 1", "answer to turn 2"]}]}

Only `choices[0]` is read, as FastChat's judge does. Any line that is not a JSON object with these
fields raises `ValueError` naming the file and the line number.
"""
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from minidpo.files import parse_jsonl

# The 80 MT-Bench questions as published on the hub. `raw/question.jsonl` keeps FastChat's question ids
# (81..160), so answers from FastChat and ours line up; the parquet copy there replaced them by hashes.
MT_BENCH_REPO = "HuggingFaceH4/mt_bench_prompts"
MT_BENCH_REVISION = "e3a795c5e9a82ee40611c416b8a7786c73198991"  # pinned: the benchmark must not drift
MT_BENCH_FILE = "raw/question.jsonl"
MT_BENCH_SIZE = 80
# Categories whose judge prompt shows a reference answer, as in FastChat's llm_judge (NEED_REF_CATS).
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")
MAX_TURNS = 2  # the judge prompts have forms for one and two turns only


@dataclass(frozen=True)
class Question:
    """One question: `turns` are the user messages (1 or 2); `reference` the reference answers, or None."""
    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None
    source: str = field(default="", compare=False)  # "file:line", for error messages
    reference_source: tuple[str, str] | None = field(default=None, compare=False)  # (file name, sha256)


@dataclass(frozen=True)
class Answer:
    """One model's answers to one question, one string per turn."""
    question_id: int | str
    model_id: str
    turns: tuple[str, ...]
    answer_id: str | None = None
    source: str = field(default="", compare=False)


def read_jsonl(path):
    """`(line_number, object)` for each non-blank line of `path`; a bad line raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return parse_jsonl(path.read_bytes(), path)


def _string_list(value, what, where, *, min_len=1, max_len=None):
    """Check that `value` is a list of strings of an allowed length; return it as a tuple."""
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValueError(f"{where}: '{what}' must be a list of strings, got {value!r:.80}")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        bound = f"{min_len}..{max_len}" if max_len is not None else f"at least {min_len}"
        raise ValueError(f"{where}: '{what}' has {len(value)} entries, expected {bound}")
    return tuple(value)


def _question_id(value, where):
    # bool is an int subclass; a `true` id is a data error, not question 1
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: 'question_id' must be an integer or a string, got {value!r:.80}")
    return value


def parse_question(obj, where):
    """One question from a JSON object (`where` names its file and line for errors)."""
    if "turns" not in obj and "prompt" not in obj:
        raise ValueError(f"{where}: missing field 'turns'")
    for key in ("question_id", "category"):
        if key not in obj:
            raise ValueError(f"{where}: missing field '{key}'")
    if not isinstance(obj["category"], str):
        raise ValueError(f"{where}: 'category' must be a string, got {obj['category']!r:.80}")
    turns = obj["turns"] if "turns" in obj else obj["prompt"]
    reference = obj.get("reference")
    # the hub copy fills questions without a reference with an empty list
    reference = _string_list(reference, "reference", where) if reference else None
    return Question(_question_id(obj["question_id"], where), obj["category"],
                    _string_list(turns, "turns", where, max_len=MAX_TURNS), reference, where)


def load_questions(path_or_name, *, references=None):
    """Questions from a JSONL file, or the 80 MT-Bench questions for the name `"mt-bench"`.

    `references` (a FastChat answers file, "fastchat", or the dict `load_references` returns) replaces the
    questions' own `reference` field where it has an entry. Returns a list in file order.
    """
    if str(path_or_name) == "mt-bench":
        path = fetch_mt_bench()
    else:
        path = Path(path_or_name)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such questions file (or use the name 'mt-bench')")
    questions, seen = [], {}
    for lineno, obj in read_jsonl(path):
        q = parse_question(obj, f"{path}:{lineno}")
        if q.question_id in seen:
            raise ValueError(f"{path}:{lineno}: question_id {q.question_id!r} already on line {seen[q.question_id]}")
        seen[q.question_id] = lineno
        questions.append(q)
    if str(path_or_name) == "mt-bench" and len(questions) != MT_BENCH_SIZE:
        raise ValueError(f"{path}: {len(questions)} questions, MT-Bench has {MT_BENCH_SIZE}")
    if references is not None:
        questions = with_references(questions, references)
    return questions


def check_unique(items, what):
    """Refuse two items (questions or answers) with one question_id; `what` names the list."""
    seen = set()
    for item in items:
        if item.question_id in seen:
            raise ValueError(f"{what}: question_id {item.question_id!r} appears twice ({item.source})")
        seen.add(item.question_id)


def as_questions(questions):
    """Questions from a path (see `load_questions`), or a list of Question objects or JSON dicts."""
    if isinstance(questions, (str, Path)):
        return load_questions(questions)
    questions = [q if isinstance(q, Question) else parse_question(q, f"questions[{i}]")
                 for i, q in enumerate(questions)]
    check_unique(questions, "questions")
    return questions


def fetch_mt_bench(revision=MT_BENCH_REVISION, cache_dir=None):
    """Download (or find in the hub cache) MT-Bench's question file; returns its local path."""
    from huggingface_hub import snapshot_download  # only this command needs the hub client

    folder = snapshot_download(MT_BENCH_REPO, repo_type="dataset", revision=revision,
                               allow_patterns=[MT_BENCH_FILE], cache_dir=cache_dir)
    path = Path(folder) / MT_BENCH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{MT_BENCH_REPO}@{revision} has no file {MT_BENCH_FILE}")
    return path


def parse_answer(obj, where):
    """One model's answer from a FastChat answer record (`choices[0].turns`)."""
    for key in ("question_id", "model_id", "choices"):
        if key not in obj:
            raise ValueError(f"{where}: missing field '{key}'")
    if not isinstance(obj["model_id"], str):
        raise ValueError(f"{where}: 'model_id' must be a string, got {obj['model_id']!r:.80}")
    choices = obj["choices"]
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError(f"{where}: 'choices' must be a non-empty list of objects")
    if "turns" not in choices[0]:
        raise ValueError(f"{where}: missing field 'choices[0].turns'")
    answer_id = obj.get("answer_id")
    return Answer(_question_id(obj["question_id"], where), obj["model_id"],
                  _string_list(choices[0]["turns"], "choices[0].turns", where),
                  None if answer_id is None else str(answer_id), where)


def load_answers(path):
    """FastChat-format answers of one model: `{question_id: Answer}` in file order.

    A question answered twice, or lines from two different models, raise ValueError naming the lines.
    """
    answers, model = {}, None
    for lineno, obj in read_jsonl(path):
        a = parse_answer(obj, f"{path}:{lineno}")
        if a.question_id in answers:
            raise ValueError(f"{path}:{lineno}: question_id {a.question_id!r} already answered "
                             f"at {answers[a.question_id].source}")
        if model is not None and a.model_id != model[0]:
            raise ValueError(f"{path}:{lineno}: model_id {a.model_id!r} differs from {model[0]!r} "
                             f"on line {model[1]}; one file holds one model's answers")
        model = model or (a.model_id, lineno)
        answers[a.question_id] = a
    return answers


def _references_path(path):
    if str(path) == "fastchat":
        from minidpo.judge_prompts import fetch_fastchat  # only this name needs the download
        return fetch_fastchat("references")
    return Path(path)


def load_references(path):
    """Reference answers from a FastChat answers file (e.g. FastChat's `reference_answer/gpt-4.jsonl`),
    or "fastchat" for that file at the pinned commit: `{question_id: (turn-1 reference, turn-2 ...)}`."""
    return {qid: a.turns for qid, a in load_answers(_references_path(path)).items()}


def with_references(questions, references):
    """Questions with `reference` taken from `references` (a path, "fastchat", or `{question_id:
    turns}`) where given; each such question records `(file name, SHA-256)` as its reference_source."""
    source = None
    if not isinstance(references, dict):
        path = _references_path(references)
        references = load_references(path)
        source = (path.name, hashlib.sha256(path.read_bytes()).hexdigest())
    return [replace(q, reference=tuple(references[q.question_id]), reference_source=source)
            if q.question_id in references else q for q in questions]
