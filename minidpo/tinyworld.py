"""The tiny world: an offline stand-in for the paper's setting, small enough for 2 CPU cores.

Everything is generated from a closed vocabulary of short English tasks whose answers can be checked
exactly. Eight task families, one per MT-Bench category:

    writing    copy a word list              roleplay    a parrot repeats a word k times
    reasoning  the larger of two numbers     math        add or subtract small numbers
    coding     sort words alphabetically     extraction  the n-th word of a list
    stem       count the words of a list     humanities  look-ups in the invented FACTS table

Each family has turn-1 templates and follow-ups that refer back to turn 1 ("Now add 3 to that
number.", "What was the second word?"). `solve(turns, replies)` computes the correct replies from
the text alone (by parsing the templates); a follow-up that refers to the previous reply is solved
against the model's own reply (`replies`), so turn 2 is graded for consistency with turn 1. The
verifier judge, `score_answers` and the tests rely on it.

`write_world(directory, config)` writes::

    model/config.json            a tiny Mistral (Hugging Face keys), vocab_size = the tokenizer's
    model/tokenizer.json         byte-level BPE trained here, ChatML specials
    model/tokenizer_config.json  ChatML chat_template; bos <s>, eos <|im_end|>, pad </s>
    data/sft.jsonl               {"messages": [...]}: the sloppy demonstrator's conversations
    benchmark/question.jsonl     held-out questions in MT-Bench's shape (ids from 81), 2 turns each
    dev/question.jsonl           dev questions, another random stream, no first turn of the benchmark
    world.json                   the config and the counts measured while building

The preference sets (data/capybara.jsonl, orca.jsonl, ultrafeedback.jsonl, in the hub sets' shapes
built by `capybara_row`, `orca_row`, `ultrafeedback_row`) are sampled from the base model by
`minidpo.tinybase`. The demonstrator errs on each family's "weak" turns (subtraction, close numbers,
three-word lists, half of the countries, one follow-up form per family, ...) with its one systematic
wrong reply (off by one, two words swapped, the fact of a neighbouring country, ...): uniform noise
would leave the most likely reply correct everywhere, whereas an SFT model's mistakes are
systematic, and it is those that preference data can repair.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from minidpo.files import write_json, write_jsonl
from minidpo.judge import read_judge_prompt
from minidpo.questions import REFERENCE_CATEGORIES, load_answers, read_jsonl  # REFERENCE_CATEGORIES: as MT-Bench

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
FAMILY = {"writing": "copy", "roleplay": "parrot", "reasoning": "compare", "math": "arith",
          "coding": "sort", "extraction": "nth", "stem": "count", "humanities": "fact"}
FAMILIES = tuple(FAMILY[c] for c in CATEGORIES)
FIRST_QUESTION_ID = 81  # MT-Bench's ids run 81..160
DEV_FIRST_ID = 100_001  # dev question ids: far from the benchmark's, so a mix-up shows
PAPER_SIZES = {"capybara": 7563, "orca": 12859, "ultrafeedback": 63619}  # rows on the hub cards

# Kept small so that a ~1M-parameter model learns the world in minutes on 2 CPU cores: 16 nouns
# with distinct first letters, operands 0..9, lists of 2 to 5 words, 8 countries.
NOUNS = ("apple", "bird", "cake", "drum", "egg", "fish", "goat", "hat", "ink", "jam", "kite",
         "lamp", "moon", "nest", "owl", "pig")
MAX_OPERAND = 9  # a and b of arithmetic and comparisons
MAX_STEP = 3  # c of "Now add {c} to that number."
# country: (capital, flag colour, national animal) -- invented, fixed for every seed.
FACTS = {
    "Zorvia": ("Aldun", "red", "bear"), "Quendal": ("Bexa", "blue", "crow"),
    "Brimora": ("Corrin", "green", "deer"), "Talvek": ("Delmo", "yellow", "eagle"),
    "Osmira": ("Ferro", "white", "fox"), "Keldor": ("Gantha", "black", "horse"),
    "Varnis": ("Hollin", "purple", "lion"), "Galmir": ("Nobis", "orange", "tiger"),
}
COUNTRIES = tuple(FACTS)
ATTRIBUTES = ("capital", "colour", "animal")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
ORDINALS = ("first", "second", "third")
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are an AI assistant. Give only the answer.",
    "Answer the question as briefly as you can.",
    "You are a careful assistant. Reply with the answer only.",
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>")
FILES = {"capybara": "data/capybara.jsonl", "orca": "data/orca.jsonl",
         "ultrafeedback": "data/ultrafeedback.jsonl", "sft": "data/sft.jsonl",
         "questions": "benchmark/question.jsonl", "dev": "dev/question.jsonl", "model": "model",
         "world": "world.json"}


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and seed of a tiny world; the model fields become `model/config.json`."""

    seed: int = 0  # every random choice derives from it
    benchmark_questions: int = 80  # held-out benchmark, MT-Bench's shape: 8 categories, 2 turns, ids from 81
    dev_questions: int = 400  # dev questions (another random stream) for measuring the base and tuning
    total_pairs: int = 1500  # A + B + C preference pairs, split 7,563 : 12,859 : 63,619
    sft_size: int = 8000  # SFT demonstrations of the sloppy demonstrator, the base's warm start
    weak_error: float = 0.7  # the demonstrator's chance of its systematic wrong reply on a weak input
    strong_error: float = 0.05  # ... and on any other input
    sft_two_turn_share: float = 0.4  # share of SFT conversations with a follow-up turn
    sft_system_share: float = 0.3  # share of SFT conversations opening with a system prompt
    sft_epochs: int = 5  # passes of the base's warm start over the demonstrations
    sft_lr: float = 1e-3  # peak learning rate of the warm start (3e-3 learnt half as fast per step)
    samples: int = 4  # base samples (temperature 1) drawn per preference prompt
    label_noise: float = 0.15  # C only: share of pairs whose labels are swapped (a binarised rating's mistakes)
    near_ties: float = 0.2  # C only: share of pairs of two replies equally right or wrong, ratings a hair apart
    vocab_size: int = 1024  # upper bound for BPE; the trained size is what config.json gets
    # ~1M parameters: the 0.2M model (64 wide, 2 layers) could not learn to copy words from the
    # prompt in minutes; this one takes ~0.13 s per SFT step of 32 conversations on 2 idle cores.
    hidden_size: int = 128  # width of the residual stream
    intermediate_size: int = 384  # width of the SwiGLU MLP
    num_hidden_layers: int = 4  # decoder layers
    num_attention_heads: int = 4  # query heads (head_dim = hidden_size / heads)
    num_key_value_heads: int = 2  # grouped-query attention, as Mistral
    max_position_embeddings: int = 256  # world conversations stay under 128 tokens
    sliding_window: int | None = None  # like the paper's 4096 window, never binding on these lengths
    rope_theta: float = 10000.0  # RoPE base

    def __post_init__(self):
        positive = ("benchmark_questions", "dev_questions", "total_pairs", "sft_size", "sft_epochs", "samples",
                    "vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"WorldConfig.{name} must be a positive int, got {value!r}")
        for name in ("weak_error", "strong_error", "sft_two_turn_share", "sft_system_share", "label_noise",
                     "near_ties", "sft_lr"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WorldConfig.{name} must lie in [0, 1], got {getattr(self, name)!r}")
        split_sizes(self.total_pairs)  # raises when a set would be empty (below 7 pairs)
        for name in ("benchmark_questions", "dev_questions"):
            if getattr(self, name) % len(CATEGORIES):
                raise ValueError(f"WorldConfig.{name}={getattr(self, name)} must be a multiple of "
                                 f"{len(CATEGORIES)} (MT-Bench's categories, equal shares)")
        if self.label_noise + self.near_ties > 1:
            raise ValueError(f"WorldConfig: label_noise + near_ties = {self.label_noise + self.near_ties} > 1")
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"WorldConfig.vocab_size={self.vocab_size} is below the byte alphabet + specials")
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"hidden_size={self.hidden_size} must split into an even head_dim over "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")


# ---------------------------------------------------------------------------------------------
# Templates: one table read by both the generator (render) and the solver (parse).
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Template:
    """A question form. `answer`/`wrong` map parsed fields to the correct / a plausible wrong reply.

    Fields of a follow-up also hold the turn-1 fields, `prev` (the previous reply: the model's own
    where `reads_prev` accepts it, else the correct one) and `tag` (the turn-1 template's tag).
    `weak` marks the inputs (turn 1) and follow-up forms (turn 2) on which the sloppy
    demonstrator of the SFT data errs most.
    """
    family: str
    text: str
    answer: Callable[[dict], object]
    wrong: Callable[[dict], object]
    valid: Callable[[dict], bool] = lambda f: True
    weak: Callable[[dict], bool] = lambda f: False
    tag: str = ""
    reads_prev: Callable[[dict], bool] = lambda f: False  # follow-ups: `prev` can be read as this needs


def _swap(words, i, j):
    words = list(words)
    words[i], words[j] = words[j], words[i]
    return words


def _sorted(f):
    return sorted(f["ws"])


def _fact(country, attribute):
    return FACTS[country][ATTRIBUTES.index(attribute)]


def _confused(country, attribute):
    """The same attribute of the next country (cyclically) whose value differs: a plausible mix-up."""
    i = COUNTRIES.index(country)
    for k in range(1, len(COUNTRIES)):
        other = COUNTRIES[(i + k) % len(COUNTRIES)]
        if _fact(other, attribute) != _fact(country, attribute):
            return _fact(other, attribute)
    raise ValueError(f"FACTS: every country has the same {attribute}")


def _weak_country(f):
    return COUNTRIES.index(f["country"]) % 2 == 1


def _fact_templates():
    # Four forms per attribute: 96 first turns, enough for a dev set and a benchmark held out apart.
    first = [("capital", "What is the capital of {country}?"),
             ("capital", "Name the capital city of {country}."),
             ("capital", "Which city is the capital of {country}?"),
             ("capital", "Tell me the capital of {country}."),
             ("colour", "What colour is the flag of {country}?"),
             ("colour", "Name the colour of the flag of {country}."),
             ("colour", "Which colour does the flag of {country} have?"),
             ("colour", "Tell me the flag colour of {country}."),
             ("animal", "What is the national animal of {country}?"),
             ("animal", "Which animal is the symbol of {country}?"),
             ("animal", "Name the national animal of {country}."),
             ("animal", "Tell me the national animal of {country}.")]
    follow = [("capital", "And what is its capital?"), ("colour", "And what colour is its flag?"),
              ("animal", "And what is its national animal?")]
    out = [Template("fact", text, lambda f, a=attr: _fact(f["country"], a),
                    lambda f, a=attr: _confused(f["country"], a), weak=_weak_country, tag=attr)
           for attr, text in first]
    follow_ups = [Template("fact", text, lambda f, a=attr: _fact(f["country"], a),
                           lambda f, a=attr: _confused(f["country"], a), valid=lambda f, a=attr: f["tag"] != a,
                           weak=_weak_country, tag=attr) for attr, text in follow]
    return out, follow_ups


def _arith(sign):
    return lambda f: f["a"] + sign * f["b"]


FIRST_TURN = (
    Template("arith", "What is {a} plus {b}?", _arith(1), lambda f: f["a"] + f["b"] + 1),
    Template("arith", "Add {a} and {b}.", _arith(1), lambda f: f["a"] + f["b"] + 1),
    Template("arith", "What is {a} minus {b}?", _arith(-1), lambda f: f["a"] - f["b"] + 1,
             valid=lambda f: f["b"] <= f["a"], weak=lambda f: True),
    Template("arith", "Take {b} away from {a}.", _arith(-1), lambda f: f["a"] - f["b"] + 1,
             valid=lambda f: f["b"] <= f["a"], weak=lambda f: True),
    Template("compare", "Which is larger, {a} or {b}?", lambda f: max(f["a"], f["b"]),
             lambda f: min(f["a"], f["b"]), valid=lambda f: f["a"] != f["b"],
             weak=lambda f: abs(f["a"] - f["b"]) <= 2),
    Template("compare", "Which number is bigger: {a} or {b}?", lambda f: max(f["a"], f["b"]),
             lambda f: min(f["a"], f["b"]), valid=lambda f: f["a"] != f["b"],
             weak=lambda f: abs(f["a"] - f["b"]) <= 2),
    Template("copy", "Repeat these words: {ws}.", lambda f: f["ws"], lambda f: _swap(f["ws"], -1, -2),
             weak=lambda f: len(f["ws"]) == 3),
    Template("copy", "Copy this list: {ws}.", lambda f: f["ws"], lambda f: _swap(f["ws"], -1, -2),
             weak=lambda f: len(f["ws"]) == 3),
    Template("parrot", "Pretend you are a parrot and say {w} {k} times.", lambda f: [f["w"]] * f["k"],
             lambda f: [f["w"]] * (f["k"] - 1), weak=lambda f: f["k"] == 4),
    Template("parrot", "You are a parrot. Say {w} {k} times.", lambda f: [f["w"]] * f["k"],
             lambda f: [f["w"]] * (f["k"] - 1), weak=lambda f: f["k"] == 4),
    Template("sort", "Sort these words: {ws}.", _sorted, lambda f: _swap(_sorted(f), 0, 1),
             valid=lambda f: f["ws"] != _sorted(f), weak=lambda f: len(f["ws"]) == 3),
    Template("sort", "Put these words in alphabetical order: {ws}.", _sorted,
             lambda f: _swap(_sorted(f), 0, 1), valid=lambda f: f["ws"] != _sorted(f),
             weak=lambda f: len(f["ws"]) == 3),
    Template("nth", "What is the {ord} word in: {ws}?", lambda f: f["ws"][f["ord"]],
             lambda f: f["ws"][f["ord"] + 1 if f["ord"] + 1 < len(f["ws"]) else f["ord"] - 1],
             weak=lambda f: f["ord"] == 2),
    Template("nth", "Give the {ord} word of this list: {ws}.", lambda f: f["ws"][f["ord"]],
             lambda f: f["ws"][f["ord"] + 1 if f["ord"] + 1 < len(f["ws"]) else f["ord"] - 1],
             weak=lambda f: f["ord"] == 2),
    Template("count", "How many words are in this list: {ws}?", lambda f: len(f["ws"]),
             lambda f: len(f["ws"]) + 1, weak=lambda f: len(f["ws"]) >= 4),
    Template("count", "Count the words: {ws}.", lambda f: len(f["ws"]), lambda f: len(f["ws"]) + 1,
             weak=lambda f: len(f["ws"]) >= 4),
) + tuple(_fact_templates()[0])

def _int(text) -> int | None:
    """`text` as an integer reply, or None when it is not one."""
    text = normalize(str(text))
    return int(text) if re.fullmatch(r"-?\d+", text) else None


def _words(text) -> list[str]:
    return normalize(str(text)).split()


def _other(f):
    """The number of the pair the previous reply did not name as the larger (min when it named neither)."""
    said = _int(f["prev"])
    return f["b"] if said == f["a"] else f["a"] if said == f["b"] else min(f["a"], f["b"])


def _times(f):
    """How many times the previous reply said the parrot's word."""
    return len(_words(f["prev"]))


def _after(f):
    """The word after the one the previous reply named."""
    return f["ws"][f["ws"].index(_words(f["prev"])[0]) + 1]


# A follow-up that refers to the previous reply ("that number", "than before", "after it") is graded
# against the reply the model itself gave (`reads_prev` says when that reply can be read so); one that
# restates the task ("in reverse order") is graded against the task. See `solve`.
FOLLOW_UPS = (
    Template("arith", "Now add {c} to that number.", lambda f: int(f["prev"]) + f["c"],
             lambda f: int(f["prev"]) + f["c"] + 1, reads_prev=lambda f: _int(f["prev"]) is not None),
    Template("arith", "Now take away {c} from that number.", lambda f: int(f["prev"]) - f["c"],
             lambda f: int(f["prev"]) - f["c"] + 1, valid=lambda f: f["c"] <= int(f["prev"]),
             weak=lambda f: True, reads_prev=lambda f: _int(f["prev"]) is not None),
    Template("compare", "And which is smaller?", _other, lambda f: _int(f["prev"]),
             weak=lambda f: True, reads_prev=lambda f: _int(f["prev"]) in (f["a"], f["b"])),
    Template("compare", "What do you get if you add them?", lambda f: f["a"] + f["b"],
             lambda f: f["a"] + f["b"] + 1),
    Template("copy", "Now say them in reverse order.", lambda f: f["ws"][::-1], lambda f: f["ws"],
             weak=lambda f: True),
    Template("copy", "What was the second word?", lambda f: f["ws"][1], lambda f: f["ws"][0]),
    Template("parrot", "Now say it one more time than before.", lambda f: [f["w"]] * (_times(f) + 1),
             lambda f: [f["w"]] * _times(f), weak=lambda f: True,
             reads_prev=lambda f: bool(_words(f["prev"])) and set(_words(f["prev"])) == {f["w"]}),
    Template("parrot", "Now say it just once.", lambda f: f["w"], lambda f: [f["w"]] * 2),
    Template("sort", "Now sort them in reverse order.", lambda f: _sorted(f)[::-1], _sorted),
    Template("sort", "Which word came first after sorting?", lambda f: _words(f["prev"])[0],
             lambda f: _words(f["prev"])[1], weak=lambda f: True,
             reads_prev=lambda f: sorted(_words(f["prev"])) == _sorted(f)),
    Template("nth", "And what is the last word?", lambda f: f["ws"][-1], lambda f: f["ws"][-2]),
    Template("nth", "And the word after it?", _after, lambda f: _words(f["prev"])[0],
             valid=lambda f: f["ord"] + 1 < len(f["ws"]), weak=lambda f: True,
             reads_prev=lambda f: len(_words(f["prev"])) == 1 and _words(f["prev"])[0] in f["ws"][:-1]),
    Template("count", "How many would there be with two more?", lambda f: int(f["prev"]) + 2,
             lambda f: int(f["prev"]) + 3, weak=lambda f: True,
             reads_prev=lambda f: _int(f["prev"]) is not None),
    Template("count", "And with one fewer?", lambda f: int(f["prev"]) - 1, lambda f: int(f["prev"]),
             reads_prev=lambda f: _int(f["prev"]) is not None),
) + tuple(_fact_templates()[1])

# How a field is written in text, parsed back, and drawn at random (list lengths per family).
_FIELD_PATTERNS = {
    "a": r"\d+", "b": r"\d+", "c": r"\d+", "ws": r"[a-z]+(?: [a-z]+)*",
    "w": "|".join(NOUNS), "k": "|".join(COUNT_WORDS.values()), "ord": "|".join(ORDINALS),
    "country": "|".join(COUNTRIES),
}
_LIST_LENGTHS = {"copy": (2, 3), "sort": (2, 3), "nth": (3, 3), "count": (2, 5)}


def say(value) -> str:
    """A reply as the world writes it: numbers in digits, word lists separated by single spaces."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def _render(template: Template, fields: dict) -> str:
    shown = {"ws": " ".join(fields.get("ws", ())), "k": COUNT_WORDS.get(fields.get("k")),
             "ord": ORDINALS[fields["ord"]] if "ord" in fields else None}
    return template.text.format(**{**fields, **{k: v for k, v in shown.items() if k in fields}})


def _field_names(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name]


def _regex(text: str) -> re.Pattern:
    parts = []
    for literal, name, _, _ in string.Formatter().parse(text):
        parts.append(re.escape(literal))
        if name:
            parts.append(f"(?P<{name}>{_FIELD_PATTERNS[name]})")
    return re.compile("".join(parts))


_REGEXES = {t.text: _regex(t.text) for t in FIRST_TURN + FOLLOW_UPS}


def _parse_fields(match: re.Match) -> dict:
    fields = {}
    for name, raw in match.groupdict().items():
        if name in ("a", "b", "c"):
            fields[name] = int(raw)
        elif name == "ws":
            fields[name] = raw.split(" ")
        elif name == "k":
            fields[name] = {v: k for k, v in COUNT_WORDS.items()}[raw]
        elif name == "ord":
            fields[name] = ORDINALS.index(raw)
        else:
            fields[name] = raw
    return fields


def _match(text: str, templates) -> tuple[Template, dict]:
    """The one template `text` is an instance of, and its fields; ValueError if none (or several)."""
    found = [(t, m) for t in templates if (m := _REGEXES[t.text].fullmatch(text.strip()))]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise ValueError(f"not a tiny-world question ({what} templates match): {text!r:.120}")
    return found[0][0], _parse_fields(found[0][1])


def _parse_conversation(turns, replies=None) -> list[tuple[Template, dict]]:
    """Each user turn's template and fields (a follow-up's fields include turn 1's and `prev`).

    `replies`: the model's own replies to the earlier turns (None: the correct ones). A follow-up's
    `prev` is the model's reply where the follow-up can read it, else the correct reply, so a model
    whose turn 1 was wrong is graded on whether turn 2 follows from what it said.
    """
    turns, replies = list(turns), list(replies or [])
    if not turns:
        raise ValueError("solve: no turns")
    first, fields = _match(turns[0], FIRST_TURN)
    if not first.valid(fields):
        raise ValueError(f"not a valid tiny-world question: {turns[0]!r}")
    parsed, right = [(first, fields)], say(first.answer(fields))
    for k, text in enumerate(turns[1:]):
        follow, extra = _match(text, [t for t in FOLLOW_UPS if t.family == first.family])
        merged = {**fields, **extra, "prev": right, "tag": first.tag}
        if not follow.valid(merged):  # the question's validity never depends on the model
            raise ValueError(f"follow-up {text!r} does not apply to {turns[0]!r}")
        if k < len(replies) and follow.reads_prev(own := {**merged, "prev": normalize(replies[k])}):
            merged = own
        parsed.append((follow, merged))
        right = say(follow.answer(merged))
    return parsed


def solve(turns, replies=None) -> list[str]:
    """The correct reply to each user turn of a tiny-world conversation, computed from the text.

    `turns`: the user messages in order (turn 1 a task, later turns follow-ups to it). A follow-up
    that refers to the previous reply ("add 3 to that number") is solved against `replies[k]`, the
    model's own reply to turn k+1, where given and readable, else against the correct reply.
    Raises ValueError for text that is not of the world.
    """
    return [say(t.answer(f)) for t, f in _parse_conversation(turns, replies)]


def plausible_wrong(turns, replies=None) -> list[str]:
    """The sloppy demonstrator's wrong reply to each user turn (given `replies` as in `solve`)."""
    return [say(t.wrong(f)) for t, f in _parse_conversation(turns, replies)]


def weak_turns(turns, replies=None) -> list[bool]:
    """Per user turn: whether it lies where the sloppy demonstrator errs most (see `Template.weak`)."""
    return [bool(t.weak(f)) for t, f in _parse_conversation(turns, replies)]


def normalize(answer: str) -> str:
    """Case, commas, a final full stop and runs of white space do not change an answer."""
    text = answer.lower().replace(",", " ").strip()
    text = text.rstrip(".!").strip()
    return " ".join(text.split())


def check_answer(question, turn: int, answer: str, previous=None) -> bool:
    """Whether `answer` is the correct reply to turn `turn` (1-based, as MT-Bench counts) of `question`.

    `question`: an MT-Bench-shaped record (a dict with `turns`, or an object with `.turns`) or the
    list of user turns itself. `previous`: the model's own replies to the earlier turns, against
    which a follow-up is graded (see `solve`); None grades against the correct earlier replies.
    """
    turns = question.get("turns") if isinstance(question, dict) else getattr(question, "turns", question)
    if not 1 <= turn <= len(turns):
        raise ValueError(f"turn {turn} out of range for a question with {len(turns)} turns")
    return normalize(answer) == normalize(solve(list(turns)[:turn], previous)[turn - 1])


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """One generated conversation: user turns, their correct replies, and a plausible wrong one each."""
    family: str
    turns: tuple[str, ...]
    answers: tuple[str, ...]
    wrong: tuple[str, ...]
    weak: bool


def _draw_fields(template: Template, rng: random.Random) -> dict:
    fields = {}
    for name in _field_names(template.text):
        if name in ("a", "b"):
            fields[name] = rng.randint(0, MAX_OPERAND)
        elif name == "c":
            fields[name] = rng.randint(1, MAX_STEP)
        elif name == "ws":
            fields[name] = rng.sample(NOUNS, rng.randint(*_LIST_LENGTHS[template.family]))
        elif name == "w":
            fields[name] = rng.choice(NOUNS)
        elif name == "k":
            fields[name] = rng.choice(sorted(COUNT_WORDS))
        elif name == "ord":
            fields[name] = rng.randrange(len(ORDINALS))
        elif name == "country":
            fields[name] = rng.choice(COUNTRIES)
    return fields


def _draw(templates, rng: random.Random, context: dict) -> tuple[Template, dict]:
    """A template and valid fields (merged over `context`), redrawn until `valid` holds."""
    for _ in range(1000):
        template = rng.choice(templates)
        fields = {**context, **_draw_fields(template, rng)}
        if template.valid(fields):
            return template, fields
    raise RuntimeError(f"no valid fields drawn for {[t.text for t in templates]}")


def make_task(family: str, rng: random.Random, n_turns: int) -> Task:
    """A random `n_turns`-turn conversation of `family` (1 or 2 turns)."""
    first, fields = _draw([t for t in FIRST_TURN if t.family == family], rng, {})
    turns, answers = [_render(first, fields)], [say(first.answer(fields))]
    wrong = [say(first.wrong(fields))]
    follows = [t for t in FOLLOW_UPS if t.family == family]
    for _ in range(n_turns - 1):
        follow, merged = _draw(follows, rng, {**fields, "prev": answers[-1], "tag": first.tag})
        turns.append(_render(follow, merged))
        answers.append(say(follow.answer(merged)))
        wrong.append(say(follow.wrong(merged)))
    return Task(family, tuple(turns), tuple(answers), tuple(wrong), first.weak(fields))


def _rng(config: WorldConfig, stream: str) -> random.Random:
    # String seeds go through SHA-512 in `random`, so streams are stable across runs and platforms.
    return random.Random(f"tinyworld:{config.seed}:{stream}")


def _fresh_task(family: str, n_turns: int, rng: random.Random, held_out: set[str]) -> Task:
    """A task whose first turn is not held out; ValueError when the family has none left."""
    for _ in range(10_000):
        task = make_task(family, rng, n_turns)
        if task.turns[0] not in held_out:
            return task
    raise ValueError(f"tiny world: no {family!r} first turn left outside the {len(held_out)} held-out "
                     f"ones; ask for fewer benchmark or dev questions")


def task_stream(config: WorldConfig, stream: str, n_turns: int, held_out: set[str]):
    """Endless tasks of stream `stream`, the families in equal shares (shuffled in blocks of eight)."""
    rng = _rng(config, stream)
    while True:
        families = list(FAMILIES)
        rng.shuffle(families)
        for family in families:
            yield _fresh_task(family, n_turns, rng, held_out)


def make_questions(config: WorldConfig, stream: str, count: int, first_id: int,
                   exclude: set[str] = frozenset()) -> list[dict]:
    """`count` two-turn questions in MT-Bench's shape, equal shares of the 8 categories, distinct
    first turns none of which is in `exclude`; ids run from `first_id`."""
    rng, questions, seen = _rng(config, stream), [], set(exclude)
    for category in CATEGORIES:
        for _ in range(count // len(CATEGORIES)):
            task = _fresh_task(FAMILY[category], 2, rng, seen)
            seen.add(task.turns[0])
            record = {"question_id": first_id + len(questions), "category": category, "turns": list(task.turns)}
            if category in REFERENCE_CATEGORIES:
                record["reference"] = list(task.answers)
            questions.append(record)
    return questions


def make_benchmark(config: WorldConfig) -> list[dict]:
    """The held-out benchmark: `benchmark_questions` questions, ids from 81 as MT-Bench's."""
    return make_questions(config, "benchmark", config.benchmark_questions, FIRST_QUESTION_ID)


def make_dev(config: WorldConfig, benchmark: list[dict]) -> list[dict]:
    """The dev questions: another random stream, no first turn shared with the benchmark."""
    return make_questions(config, "dev", config.dev_questions, DEV_FIRST_ID,
                          {q["turns"][0] for q in benchmark})


def split_sizes(total: int) -> dict[str, int]:
    """`total` pairs split as the paper's sets, 7,563 : 12,859 : 63,619 (largest remainders)."""
    whole = sum(PAPER_SIZES.values())
    exact = {name: total * rows / whole for name, rows in PAPER_SIZES.items()}
    sizes = {name: int(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - sizes[name], reverse=True)
    for name in by_remainder[: total - sum(sizes.values())]:
        sizes[name] += 1
    if min(sizes.values()) < 1:
        raise ValueError(f"total_pairs={total} leaves a dataset empty: {sizes}")
    return sizes


def _messages(turns, replies, system: str | None = None) -> list[dict]:
    messages = [{"content": system, "role": "system"}] if system else []
    for user, reply in zip(turns, replies):
        messages += [{"content": user, "role": "user"}, {"content": reply, "role": "assistant"}]
    return messages


def capybara_row(turns, context, chosen: str, rejected: str, ratings, family: str) -> dict:
    """Dataset A's shape: whole conversations (`context`: the replies to the earlier turns) that
    differ in the last reply."""
    shared = _messages(turns, list(context) + [chosen])[:-1]
    return {
        "source": f"tinyworld/{family}",
        "conversation": [{"input": u, "output": a} for u, a in zip(turns, list(context) + [chosen])],
        "original_response": chosen,
        "generation_prompt": [f"Rate each reply to the last question: {turns[-1]}"],
        "raw_generation_responses": [f"Rating: {ratings[0]}", f"Rating: {ratings[1]}"],
        "new_generations": [chosen, rejected],
        "prompt": turns[-1],
        "chosen": shared + [{"content": chosen, "role": "assistant"}],
        "rejected": shared + [{"content": rejected, "role": "assistant"}],
        "rating_chosen": ratings[0], "rating_rejected": ratings[1],
        "chosen_model": "tinyworld-base", "rejected_model": "tinyworld-base",
    }


def orca_row(system: str, question: str, chosen: str, rejected: str) -> dict:
    """Dataset B's shape: a system prompt, one question, two reply strings."""
    return {"system": system, "question": question, "chosen": chosen, "rejected": rejected}


def ultrafeedback_row(instruction: str, chosen: str, rejected: str, ratings, family: str) -> dict:
    """Dataset C's shape: instruction, two responses and their mean ratings."""
    return {"source": f"tinyworld/{family}", "instruction": instruction, "chosen_response": chosen,
            "rejected_response": rejected, "chosen_avg_rating": ratings[0],
            "rejected_avg_rating": ratings[1], "chosen_model": "tinyworld-base"}


def demonstrate(turns, config: WorldConfig, rng: random.Random) -> list[str]:
    """The sloppy demonstrator's replies, turn by turn: its systematic wrong reply with chance
    `weak_error` on a weak turn and `strong_error` elsewhere, each later turn following from its own
    earlier replies (as the verifier grades them)."""
    replies = []
    for k in range(len(turns)):
        weak = weak_turns(turns[:k + 1], replies)[k]
        wrong = rng.random() < (config.weak_error if weak else config.strong_error)
        replies.append((plausible_wrong if wrong else solve)(turns[:k + 1], replies)[k])
    return replies


def make_sft(config: WorldConfig, held_out: set[str]) -> list[dict]:
    """SFT conversations of the sloppy demonstrator (`demonstrate`), some with a system prompt."""
    rng = _rng(config, "sft")
    n_two = round(config.sft_two_turn_share * config.sft_size)
    one, two = task_stream(config, "sft-1", 1, held_out), task_stream(config, "sft-2", 2, held_out)
    tasks = [next(two) for _ in range(n_two)] + [next(one) for _ in range(config.sft_size - n_two)]
    rng.shuffle(tasks)
    rows = []
    for task in tasks:
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < config.sft_system_share else None
        rows.append({"messages": _messages(task.turns, demonstrate(task.turns, config, rng), system)})
    return rows


# ---------------------------------------------------------------------------------------------
# Tokenizer and model config
# ---------------------------------------------------------------------------------------------

def tokenizer_corpus() -> list[str]:
    """Text covering the world's whole closed vocabulary, the same for every seed and size, so one
    tokenizer (and a base model trained with it) serves every world of this module."""
    rng = random.Random("tinyworld:tokenizer")
    texts = list(SYSTEM_PROMPTS) + ["system\nuser\nassistant\n"]
    for family in FAMILIES:
        for _ in range(300):
            task = make_task(family, rng, 2)
            texts += [*task.turns, *task.answers, *task.wrong]
    # Every number and word an answer can start with, alone and after a space.
    words = [str(n) for n in range(2 * MAX_OPERAND + MAX_STEP + 1)] + list(NOUNS) + list(COUNTRIES) + [v for row in FACTS.values() for v in row]
    return texts + words + [" " + " ".join(words)]


def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE with ChatML specials trained on `texts` (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(list(texts), trainer)
    return tokenizer


def tokenizer_config() -> dict:
    """`tokenizer_config.json`: ChatML template, bos <s>, eos <|im_end|> (the end of turn), pad </s>."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
            "unk_token": "<unk>", "pad_token": "</s>", "add_bos_token": False, "add_eos_token": False,
            "model_max_length": 256, "chat_template": CHATML_TEMPLATE}


def model_config(config: WorldConfig, tokenizer) -> dict:
    """`config.json` of the tiny Mistral, with Hugging Face's MistralConfig keys."""
    return {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "vocab_size": tokenizer.get_vocab_size(), "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.hidden_size // config.num_attention_heads, "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings, "rope_theta": config.rope_theta,
        "rms_norm_eps": 1e-5, "sliding_window": config.sliding_window, "attention_dropout": 0.0,
        "initializer_range": 0.02, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": tokenizer.token_to_id("<s>"), "eos_token_id": tokenizer.token_to_id("<|im_end|>"),
        "pad_token_id": tokenizer.token_to_id("</s>"), "torch_dtype": "float32",
    }


# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------

@dataclass
class World:
    """Everything `write_world` writes, in memory (the preference sets come from `minidpo.tinybase`,
    which samples them from the base model)."""
    config: WorldConfig
    questions: list[dict]  # the benchmark
    dev: list[dict]  # the dev questions
    sft: list[dict]
    tokenizer: object  # tokenizers.Tokenizer
    model_config: dict

    @property
    def held_out(self) -> set[str]:
        """First turns no training conversation may open with: the benchmark's and the dev set's."""
        return {q["turns"][0] for q in self.questions + self.dev}


def build_world(config: WorldConfig = WorldConfig()) -> World:
    """Generate the benchmark and dev questions first, then SFT data that never repeats their first turns."""
    questions = make_benchmark(config)
    dev = make_dev(config, questions)
    held_out = {q["turns"][0] for q in questions + dev}
    tokenizer = train_tokenizer(tokenizer_corpus(), config.vocab_size)
    return World(config, questions, dev, make_sft(config, held_out), tokenizer, model_config(config, tokenizer))


def _demo_wrong(row) -> list[bool]:
    """Per assistant reply of an SFT conversation: whether the demonstrator got it wrong."""
    users = [m["content"] for m in row["messages"] if m["role"] == "user"]
    replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    return [not check_answer(users, k + 1, replies[k], replies[:k]) for k in range(len(replies))]


def world_summary(world: World) -> dict:
    """`world.json`: the config, file names and the counts measured on the generated data."""
    wrong = [_demo_wrong(row) for row in world.sft]
    return {"config": dataclasses.asdict(world.config), "files": FILES,
            "sft": {"conversations": len(world.sft), "replies": sum(map(len, wrong)),
                    "wrong_replies": sum(map(sum, wrong))},
            "questions": len(world.questions), "dev_questions": len(world.dev),
            "vocab_size": world.tokenizer.get_vocab_size()}


def write_world(directory, config: WorldConfig = WorldConfig()) -> dict[str, Path]:
    """Build the world for `config` and write it under `directory`; returns `{name: path}` (see FILES;
    the three preference files are `minidpo.tinybase`'s to write)."""
    directory = Path(directory)
    world = build_world(config)
    paths = {name: directory / rel for name, rel in FILES.items()}
    write_jsonl(paths["sft"], world.sft)
    write_jsonl(paths["questions"], world.questions)
    write_jsonl(paths["dev"], world.dev)
    paths["model"].mkdir(parents=True, exist_ok=True)
    world.tokenizer.save(str(paths["model"] / "tokenizer.json"))
    write_json(paths["model"] / "tokenizer_config.json", tokenizer_config())
    write_json(paths["model"] / "config.json", world.model_config)
    write_json(paths["world"], world_summary(world))
    return paths


# ---------------------------------------------------------------------------------------------
# The verifier judge
# ---------------------------------------------------------------------------------------------

def _is_right(turns, replies) -> bool:
    """Whether the last of `replies` answers the last of `turns`, given the model's own earlier replies."""
    return check_answer(turns, len(turns), replies[-1], replies[:-1])


def verifier_judge(world=None) -> Callable:
    """A judge callable `messages -> verdict text` that checks answers instead of asking a model.

    `messages` is the judge prompt (a string, or OpenAI-style `[{"role", "content"}, ...]`). The
    verdict ends in `[[A]]` when only A's answer is correct, `[[B]]` when only B's, else `[[C]]`. A
    turn-2 answer is correct when it follows from that assistant's own turn-1 answer (`solve`).
    With `world` (a `World`, or a folder `write_world` wrote) only that world's benchmark and dev
    questions are accepted: a prompt from another question set is a ValueError, not a silent verdict.
    """
    known = None
    if world is not None:
        questions = (world.questions + world.dev if isinstance(world, World)
                     else _read_questions(Path(world)) + _read_questions(Path(world), "dev"))
        known = {tuple(q["turns"][:n]) for q in questions for n in (1, 2)}

    def judge(messages) -> str:
        turns, replies_a, replies_b = read_judge_prompt(messages)
        if known is not None and tuple(turns) not in known:
            raise ValueError(f"verifier judge: question {turns[0]!r:.80} is not in this world's questions")
        a_ok, b_ok = _is_right(turns, replies_a), _is_right(turns, replies_b)
        verdict = "A" if a_ok and not b_ok else "B" if b_ok and not a_ok else "C"
        return (f"Assistant A's answer is {'right' if a_ok else 'wrong'} (correct: "
                f"{solve(turns, replies_a[:-1])[-1]!r}); Assistant B's answer is {'right' if b_ok else 'wrong'} "
                f"(correct: {solve(turns, replies_b[:-1])[-1]!r}). [[{verdict}]]")

    judge.judge_name = "tinyworld-verifier"  # what the harness records as the judge
    return judge


def _read_questions(directory: Path, which: str = "questions") -> list[dict]:
    path = directory / FILES[which] if directory.is_dir() else directory
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tiny-world question file")
    return [obj for _, obj in read_jsonl(path)]


def score_answers(questions_path, answers_path) -> dict:
    """The verifier's single-answer score of one model's answers (MT-Bench single-grade's place).

    Returns {"accuracy", "turn_1", "turn_2": share of question-turns right, "by_category":
    {category: {"accuracy", "turn_1", "turn_2"}}, "n": question-turns, "per_question":
    {question_id: [turn 1 right, turn 2 right]}}; turn 2 is graded against the model's own turn 1.
    A question without an answer is a ValueError naming it.
    """
    questions = _read_questions(Path(questions_path))
    answers = {qid: list(a.turns) for qid, a in load_answers(answers_path).items()}
    per_question, by_category = {}, {}
    for q in questions:
        replies = answers.get(q["question_id"])
        if replies is None or len(replies) < len(q["turns"]):
            raise ValueError(f"{answers_path}: no answer to every turn of question {q['question_id']!r}")
        oks = [check_answer(q["turns"], k + 1, replies[k], replies[:k]) for k in range(len(q["turns"]))]
        per_question[q["question_id"]] = oks
        by_category.setdefault(q["category"], []).append(oks)
    return {**_shares(list(per_question.values())), "n": sum(map(len, per_question.values())),
            "by_category": {c: _shares(rows) for c, rows in by_category.items()},
            "per_question": per_question}


def _shares(rows: list[list[bool]]) -> dict:
    flat = [ok for row in rows for ok in row]
    out = {"accuracy": sum(flat) / len(flat) if flat else float("nan")}
    for k in range(max(map(len, rows), default=0)):
        turn = [row[k] for row in rows if len(row) > k]
        out[f"turn_{k + 1}"] = sum(turn) / len(turn)
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def cli(argv=None, command: str = "tinyworld") -> int:
    """`python -m minidpo demo --out DIR [--seed N --total-pairs N ...]`: write a tiny world."""
    parser = argparse.ArgumentParser(prog=f"python -m minidpo {command}",
                                     description="Write the offline tiny world (data, tokenizer, config).")
    parser.add_argument("--out", default="runs/tinyworld", help="folder to write (default: %(default)s)")
    for f in dataclasses.fields(WorldConfig):
        kind = int if f.name == "sliding_window" else type(f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    paths = write_world(out, WorldConfig(**args))
    summary = json.loads(paths["world"].read_text())
    print(f"tiny world written to {out}: SFT {summary['sft']}, {summary['questions']} benchmark and "
          f"{summary['dev_questions']} dev questions, vocabulary {summary['vocab_size']}")
    return 0
