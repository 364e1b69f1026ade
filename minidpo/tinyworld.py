"""The tiny world: an offline stand-in for the paper's setting, small enough for 2 CPU cores.

Everything is generated from a closed vocabulary of short English tasks whose answers can be checked
exactly. Eight task families, one per MT-Bench category:

    writing    copy a word list              roleplay    a parrot repeats a word k times
    reasoning  the larger of two numbers     math        add or subtract small numbers
    coding     sort words alphabetically     extraction  the n-th word of a list
    stem       count the words of a list     humanities  look-ups in the invented FACTS table

Each family has turn-1 templates and follow-ups that refer back to turn 1 ("Now add 3 to that
number.", "What was the second word?"). `solve(turns)` computes the correct replies from the text
alone (by parsing the templates), which is what the verifier judge and the tests rely on.

`write_world(directory, config)` writes::

    model/config.json            a tiny Mistral (Hugging Face keys), vocab_size = the tokenizer's
    model/tokenizer.json         byte-level BPE trained here, ChatML specials
    model/tokenizer_config.json  ChatML chat_template; bos <s>, eos <|im_end|>, pad </s>
    data/capybara.jsonl          A: multi-turn pairs, shape of argilla/distilabel-capybara-dpo-7k-binarized
    data/orca.jsonl              B: single-turn pairs with a system prompt, shape of Intel/orca_dpo_pairs
    data/ultrafeedback.jsonl     C: single-turn pairs, shape of argilla/ultrafeedback-binarized-preferences
    data/sft.jsonl               {"messages": [...]} demonstrations, a share of them wrong
    benchmark/question.jsonl     80 held-out questions in MT-Bench's shape (ids 81..160), 2 turns each
    world.json                   the config and the counts measured while building

Chosen replies are correct and rejected ones plausibly wrong (off by one, two words swapped, the
fact of a neighbouring country, ...). Wrong SFT demonstrations are concentrated on each family's
"weak" inputs (subtraction, close numbers, three-word lists, half of the countries, ...): uniform
noise would leave the most likely reply correct everywhere, whereas an SFT model's mistakes are
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

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
FAMILY = {"writing": "copy", "roleplay": "parrot", "reasoning": "compare", "math": "arith",
          "coding": "sort", "extraction": "nth", "stem": "count", "humanities": "fact"}
FAMILIES = tuple(FAMILY[c] for c in CATEGORIES)
REFERENCE_CATEGORIES = ("math", "reasoning", "coding")  # as MT-Bench: only these carry `reference`
FIRST_QUESTION_ID = 81  # MT-Bench's ids run 81..160
QUESTIONS_PER_CATEGORY = 10
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
         "questions": "benchmark/question.jsonl", "model": "model", "world": "world.json"}


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and seed of a tiny world; the model fields become `model/config.json`."""

    seed: int = 0  # every random choice derives from it
    total_pairs: int = 1500  # A + B + C preference pairs, split 7,563 : 12,859 : 63,619
    sft_size: int = 4000  # SFT demonstrations for the base model's warm start
    sft_error_rate: float = 0.35  # exact share of SFT demonstrations with a wrong last reply
    sft_error_focus: float = 0.8  # share of those wrong demonstrations taken from weak inputs
    sft_two_turn_share: float = 0.4  # share of SFT conversations with a follow-up turn
    sft_system_share: float = 0.3  # share of SFT conversations opening with a system prompt
    vocab_size: int = 1024  # upper bound for BPE; the trained size is what config.json gets
    # ~0.2M parameters: cheap enough for ~1,000 SFT steps of 32 conversations on 2 CPU cores,
    # which is about what it takes to learn the world (wider/deeper models were slower per step).
    hidden_size: int = 64  # width of the residual stream
    intermediate_size: int = 192  # width of the SwiGLU MLP
    num_hidden_layers: int = 2  # decoder layers
    num_attention_heads: int = 4  # query heads (head_dim = hidden_size / heads)
    num_key_value_heads: int = 2  # grouped-query attention, as Mistral
    max_position_embeddings: int = 256  # world conversations stay under 128 tokens
    sliding_window: int | None = None  # like the paper's 4096 window, never binding on these lengths
    rope_theta: float = 10000.0  # RoPE base

    def __post_init__(self):
        positive = ("total_pairs", "sft_size", "vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"WorldConfig.{name} must be a positive int, got {value!r}")
        for name in ("sft_error_rate", "sft_error_focus", "sft_two_turn_share", "sft_system_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WorldConfig.{name} must lie in [0, 1], got {getattr(self, name)!r}")
        split_sizes(self.total_pairs)  # raises when a set would be empty (below 7 pairs)
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

    Fields of a follow-up also hold the turn-1 fields, `prev` (the correct previous reply) and
    `tag` (the turn-1 template's tag). `weak` (turn-1 templates only) marks inputs on which the
    SFT demonstrations err most.
    """
    family: str
    text: str
    answer: Callable[[dict], object]
    wrong: Callable[[dict], object]
    valid: Callable[[dict], bool] = lambda f: True
    weak: Callable[[dict], bool] = lambda f: False
    tag: str = ""


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
    first = [("capital", "What is the capital of {country}?"),
             ("capital", "Name the capital city of {country}."),
             ("colour", "What colour is the flag of {country}?"),
             ("colour", "Name the colour of the flag of {country}."),
             ("animal", "What is the national animal of {country}?"),
             ("animal", "Which animal is the symbol of {country}?")]
    follow = [("capital", "And what is its capital?"), ("colour", "And what colour is its flag?"),
              ("animal", "And what is its national animal?")]
    out = [Template("fact", text, lambda f, a=attr: _fact(f["country"], a),
                    lambda f, a=attr: _confused(f["country"], a), weak=_weak_country, tag=attr)
           for attr, text in first]
    follow_ups = [Template("fact", text, lambda f, a=attr: _fact(f["country"], a),
                           lambda f, a=attr: _confused(f["country"], a),
                           valid=lambda f, a=attr: f["tag"] != a, tag=attr) for attr, text in follow]
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

FOLLOW_UPS = (
    Template("arith", "Now add {c} to that number.", lambda f: int(f["prev"]) + f["c"],
             lambda f: int(f["prev"]) + f["c"] + 1),
    Template("arith", "Now take away {c} from that number.", lambda f: int(f["prev"]) - f["c"],
             lambda f: int(f["prev"]) - f["c"] + 1, valid=lambda f: f["c"] <= int(f["prev"])),
    Template("compare", "And which is smaller?", lambda f: min(f["a"], f["b"]), lambda f: max(f["a"], f["b"])),
    Template("compare", "What do you get if you add them?", lambda f: f["a"] + f["b"],
             lambda f: f["a"] + f["b"] + 1),
    Template("copy", "Now say them in reverse order.", lambda f: f["ws"][::-1], lambda f: f["ws"]),
    Template("copy", "What was the second word?", lambda f: f["ws"][1], lambda f: f["ws"][0]),
    Template("parrot", "Now say it one more time than before.", lambda f: [f["w"]] * (f["k"] + 1),
             lambda f: [f["w"]] * f["k"]),
    Template("parrot", "Now say it just once.", lambda f: f["w"], lambda f: [f["w"]] * 2),
    Template("sort", "Now sort them in reverse order.", lambda f: _sorted(f)[::-1], _sorted),
    Template("sort", "Which word came first after sorting?", lambda f: _sorted(f)[0], lambda f: _sorted(f)[1]),
    Template("nth", "And what is the last word?", lambda f: f["ws"][-1], lambda f: f["ws"][-2]),
    Template("nth", "And the word after it?", lambda f: f["ws"][f["ord"] + 1], lambda f: f["ws"][f["ord"]],
             valid=lambda f: f["ord"] + 1 < len(f["ws"])),
    Template("count", "How many would there be with two more?", lambda f: len(f["ws"]) + 2,
             lambda f: len(f["ws"]) + 3),
    Template("count", "And with one fewer?", lambda f: len(f["ws"]) - 1, lambda f: len(f["ws"])),
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


def _parse_conversation(turns) -> list[tuple[Template, dict]]:
    """Each user turn's template and fields (a follow-up's fields include turn 1's and `prev`)."""
    turns = list(turns)
    if not turns:
        raise ValueError("solve: no turns")
    first, fields = _match(turns[0], FIRST_TURN)
    if not first.valid(fields):
        raise ValueError(f"not a valid tiny-world question: {turns[0]!r}")
    parsed, prev = [(first, fields)], say(first.answer(fields))
    for text in turns[1:]:
        follow, extra = _match(text, [t for t in FOLLOW_UPS if t.family == first.family])
        merged = {**fields, **extra, "prev": prev, "tag": first.tag}
        if not follow.valid(merged):
            raise ValueError(f"follow-up {text!r} does not apply to {turns[0]!r}")
        parsed.append((follow, merged))
        prev = say(follow.answer(merged))
    return parsed


def solve(turns) -> list[str]:
    """The correct reply to each user turn of a tiny-world conversation, computed from the text.

    `turns`: the user messages in order (turn 1 a task, later turns follow-ups to it; a follow-up
    refers to the correct previous reply). Raises ValueError for text that is not of the world.
    """
    return [say(t.answer(f)) for t, f in _parse_conversation(turns)]


def plausible_wrong(turns) -> list[str]:
    """The plausible wrong reply to each user turn (what rejected replies and wrong demos say)."""
    return [say(t.wrong(f)) for t, f in _parse_conversation(turns)]


def is_weak(turns) -> bool:
    """Whether the conversation's first turn lies where the SFT demonstrations err most."""
    template, fields = _parse_conversation(turns[:1])[0]
    return template.weak(fields)


def normalize(answer: str) -> str:
    """Case, commas, a final full stop and runs of white space do not change an answer."""
    text = answer.lower().replace(",", " ").strip()
    text = text.rstrip(".!").strip()
    return " ".join(text.split())


def check_answer(question, turn: int, answer: str) -> bool:
    """Whether `answer` is the correct reply to turn `turn` (1-based, as MT-Bench counts) of `question`.

    `question`: an MT-Bench-shaped record (a dict with `turns`, or an object with `.turns`) or the
    list of user turns itself.
    """
    turns = question.get("turns") if isinstance(question, dict) else getattr(question, "turns", question)
    if not 1 <= turn <= len(turns):
        raise ValueError(f"turn {turn} out of range for a question with {len(turns)} turns")
    return normalize(answer) == normalize(solve(list(turns)[:turn])[turn - 1])


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


def _tasks(n: int, n_turns: int, rng: random.Random, held_out: set[str]) -> list[Task]:
    """`n` tasks, families in equal shares (in shuffled order), none opening with a held-out text."""
    families = [FAMILIES[i % len(FAMILIES)] for i in range(n)]
    rng.shuffle(families)
    tasks = []
    for family in families:
        task = make_task(family, rng, n_turns)
        while task.turns[0] in held_out:
            task = make_task(family, rng, n_turns)
        tasks.append(task)
    return tasks


def make_benchmark(config: WorldConfig) -> list[dict]:
    """80 two-turn questions in MT-Bench's shape, 10 per category, distinct first turns."""
    rng, questions, seen = _rng(config, "benchmark"), [], set()
    for category in CATEGORIES:
        count = 0
        while count < QUESTIONS_PER_CATEGORY:
            task = make_task(FAMILY[category], rng, 2)
            if task.turns[0] in seen:
                continue
            seen.add(task.turns[0])
            record = {"question_id": FIRST_QUESTION_ID + len(questions), "category": category,
                      "turns": list(task.turns)}
            if category in REFERENCE_CATEGORIES:
                record["reference"] = list(task.answers)
            questions.append(record)
            count += 1
    return questions


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


def capybara_row(task: Task, rng: random.Random) -> dict:
    """Dataset A's shape: `chosen`/`rejected` whole conversations differing in the last reply."""
    shared = _messages(task.turns, task.answers)[:-1]
    chosen_rating, rejected_rating = rng.randint(4, 5), rng.randint(1, 3)
    return {
        "source": f"tinyworld/{task.family}",
        "conversation": [{"input": u, "output": a} for u, a in zip(task.turns, task.answers)],
        "original_response": task.answers[-1],
        "generation_prompt": [f"Rate each reply to the last question: {task.turns[-1]}"],
        "raw_generation_responses": [f"Rating: {chosen_rating}", f"Rating: {rejected_rating}"],
        "new_generations": [task.answers[-1], task.wrong[-1]],
        "prompt": task.turns[-1],
        "chosen": shared + [{"content": task.answers[-1], "role": "assistant"}],
        "rejected": shared + [{"content": task.wrong[-1], "role": "assistant"}],
        "rating_chosen": chosen_rating, "rating_rejected": rejected_rating,
        "chosen_model": "tinyworld-oracle", "rejected_model": "tinyworld-sloppy",
    }


def orca_row(task: Task, rng: random.Random) -> dict:
    """Dataset B's shape: a system prompt, one question, two reply strings."""
    return {"system": rng.choice(SYSTEM_PROMPTS), "question": task.turns[0],
            "chosen": task.answers[0], "rejected": task.wrong[0]}


def ultrafeedback_row(task: Task, rng: random.Random) -> dict:
    """Dataset C's shape: instruction, two responses, their mean ratings (never equal here)."""
    return {"source": f"tinyworld/{task.family}", "instruction": task.turns[0],
            "chosen_response": task.answers[0], "rejected_response": task.wrong[0],
            "chosen_avg_rating": rng.choice((4.25, 4.5, 4.75, 5.0)),
            "rejected_avg_rating": rng.choice((1.5, 2.0, 2.5, 3.0, 3.5)),
            "chosen_model": "tinyworld-oracle"}


def make_preferences(config: WorldConfig, held_out: set[str]) -> dict[str, list[dict]]:
    """The three preference sets; A is two-turn, B and C single-turn."""
    sizes, out = split_sizes(config.total_pairs), {}
    for name, turns, row in (("capybara", 2, capybara_row), ("orca", 1, orca_row),
                             ("ultrafeedback", 1, ultrafeedback_row)):
        rng = _rng(config, name)
        out[name] = [row(task, rng) for task in _tasks(sizes[name], turns, rng, held_out)]
    return out


def _wrong_indices(tasks: list[Task], config: WorldConfig, rng: random.Random) -> set[int]:
    """Exactly round(rate * n) indices, `focus` of them from weak tasks where there are enough."""
    n_wrong = round(config.sft_error_rate * len(tasks))
    weak = [i for i, t in enumerate(tasks) if t.weak]
    strong = [i for i, t in enumerate(tasks) if not t.weak]
    n_weak = min(len(weak), round(config.sft_error_focus * n_wrong))
    n_strong = min(len(strong), n_wrong - n_weak)
    n_weak = n_wrong - n_strong  # the weak share takes up what the strong one cannot
    return set(rng.sample(weak, n_weak)) | set(rng.sample(strong, n_strong))


def make_sft(config: WorldConfig, held_out: set[str]) -> list[dict]:
    """SFT conversations; a fixed share end in the task's plausible wrong reply."""
    rng = _rng(config, "sft")
    n_two = round(config.sft_two_turn_share * config.sft_size)
    tasks = (_tasks(n_two, 2, rng, held_out) + _tasks(config.sft_size - n_two, 1, rng, held_out))
    rng.shuffle(tasks)
    wrong = _wrong_indices(tasks, config, rng)
    rows = []
    for i, task in enumerate(tasks):
        replies = task.answers[:-1] + ((task.wrong if i in wrong else task.answers)[-1],)
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < config.sft_system_share else None
        rows.append({"messages": _messages(task.turns, replies, system)})
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
    """Everything `write_world` writes, in memory."""
    config: WorldConfig
    questions: list[dict]
    preferences: dict[str, list[dict]]  # "capybara", "orca", "ultrafeedback" -> rows
    sft: list[dict]
    tokenizer: object  # tokenizers.Tokenizer
    model_config: dict


def build_world(config: WorldConfig = WorldConfig()) -> World:
    """Generate the benchmark first, then training data that never repeats a benchmark first turn."""
    questions = make_benchmark(config)
    held_out = {q["turns"][0] for q in questions}
    tokenizer = train_tokenizer(tokenizer_corpus(), config.vocab_size)
    return World(config, questions, make_preferences(config, held_out), make_sft(config, held_out),
                 tokenizer, model_config(config, tokenizer))


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def world_summary(world: World) -> dict:
    """`world.json`: the config, file names and the counts measured on the generated data."""
    sft_wrong = sum(not check_answer([m["content"] for m in row["messages"] if m["role"] == "user"],
                                     sum(m["role"] == "user" for m in row["messages"]),
                                     row["messages"][-1]["content"]) for row in world.sft)
    return {"config": dataclasses.asdict(world.config), "files": FILES,
            "pairs": {name: len(rows) for name, rows in world.preferences.items()},
            "sft": {"conversations": len(world.sft), "wrong": sft_wrong},
            "questions": len(world.questions), "vocab_size": world.tokenizer.get_vocab_size()}


def write_world(directory, config: WorldConfig = WorldConfig()) -> dict[str, Path]:
    """Build the world for `config` and write it under `directory`; returns `{name: path}` (see FILES)."""
    directory = Path(directory)
    world = build_world(config)
    paths = {name: directory / rel for name, rel in FILES.items()}
    for name in ("capybara", "orca", "ultrafeedback"):
        _write_jsonl(paths[name], world.preferences[name])
    _write_jsonl(paths["sft"], world.sft)
    _write_jsonl(paths["questions"], world.questions)
    paths["model"].mkdir(parents=True, exist_ok=True)
    world.tokenizer.save(str(paths["model"] / "tokenizer.json"))
    _write_json(paths["model"] / "tokenizer_config.json", tokenizer_config())
    _write_json(paths["model"] / "config.json", world.model_config)
    _write_json(paths["world"], world_summary(world))
    return paths


# ---------------------------------------------------------------------------------------------
# The verifier judge
# ---------------------------------------------------------------------------------------------

_A_ANSWER = ("[The Start of Assistant A's Answer]", "[The End of Assistant A's Answer]")
_B_ANSWER = ("[The Start of Assistant B's Answer]", "[The End of Assistant B's Answer]")
_A_CONVERSATION = ("<|The Start of Assistant A's Conversation with User|>",
                   "<|The End of Assistant A's Conversation with User|>")
_B_CONVERSATION = ("<|The Start of Assistant B's Conversation with User|>",
                   "<|The End of Assistant B's Conversation with User|>")
_QUESTION = "[User Question]"
_HEADER = re.compile(r"^### (User|Assistant [AB]|Reference answer):[ \t]*$", re.MULTILINE)


def _between(text: str, markers: tuple[str, str]) -> str:
    start, end = markers
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        raise ValueError(f"judge prompt: no {start!r} ... {end!r} block")
    return text[i + len(start):j]


def _conversation(block: str) -> tuple[list[str], str]:
    """User turns and the last assistant reply of one `### User:` / `### Assistant X:` block."""
    heads = list(_HEADER.finditer(block))
    users, last_reply = [], None
    for k, head in enumerate(heads):
        body = block[head.end(): heads[k + 1].start() if k + 1 < len(heads) else len(block)].strip()
        if head.group(1) == "User":
            users.append(body)
        else:
            last_reply = body
    if not users or last_reply is None:
        raise ValueError("judge prompt: a conversation block without '### User:' and an assistant reply")
    return users, last_reply


def parse_judge_prompt(text: str) -> tuple[list[str], str, str]:
    """MT-Bench pairwise judge text -> (user turns up to the judged one, answer A, answer B).

    Turn 1 is recognised by `[User Question]` and the `[The Start of Assistant A's Answer]` markers,
    turn 2 by the `<|The Start of Assistant A's Conversation with User|>` form; whatever instructions
    surround them are ignored.
    """
    if _A_CONVERSATION[0] in text:
        users_a, answer_a = _conversation(_between(text, _A_CONVERSATION))
        users_b, answer_b = _conversation(_between(text, _B_CONVERSATION))
        if users_a != users_b:
            raise ValueError("judge prompt: the two conversations show different user turns")
        # An answer that itself prints '### User:' would add turns; the first and last are the real ones.
        return [users_a[0], users_a[-1]], answer_a, answer_b
    if _QUESTION not in text:
        raise ValueError("judge prompt: neither '[User Question]' nor a conversation block found")
    question = text.split(_QUESTION, 1)[1].split("[The Start of", 1)[0].strip()
    return [question], _between(text, _A_ANSWER).strip(), _between(text, _B_ANSWER).strip()


def _prompt_text(messages) -> str:
    """The message holding the markers (the last one that has any), so instructions cannot confuse us."""
    if isinstance(messages, str):
        return messages
    for message in reversed(list(messages)):
        if _QUESTION in message["content"] or _A_CONVERSATION[0] in message["content"]:
            return message["content"]
    return "\n".join(m["content"] for m in messages)


def verifier_judge(world=None) -> Callable:
    """A judge callable `messages -> verdict text` that checks answers instead of asking a model.

    `messages` is the judge prompt (a string, or OpenAI-style `[{"role", "content"}, ...]`). The
    verdict ends in `[[A]]` when only A's answer is correct, `[[B]]` when only B's, else `[[C]]`.
    With `world` (a `World`, or a folder `write_world` wrote) only that world's benchmark questions
    are accepted: a prompt from another question set is a ValueError, not a silent verdict.
    """
    known = None
    if world is not None:
        questions = world.questions if isinstance(world, World) else _read_questions(Path(world))
        known = {tuple(q["turns"][:n]) for q in questions for n in (1, 2)}

    def judge(messages) -> str:
        turns, answer_a, answer_b = parse_judge_prompt(_prompt_text(messages))
        if known is not None and tuple(turns) not in known:
            raise ValueError(f"verifier judge: question {turns[0]!r:.80} is not in this world's benchmark")
        correct = solve(turns)[-1]
        a_ok, b_ok = (normalize(x) == normalize(correct) for x in (answer_a, answer_b))
        verdict = "A" if a_ok and not b_ok else "B" if b_ok and not a_ok else "C"
        return (f"The correct answer is {correct!r}. Assistant A's answer is {'right' if a_ok else 'wrong'}; "
                f"Assistant B's answer is {'right' if b_ok else 'wrong'}. [[{verdict}]]")

    judge.judge_name = "tinyworld-verifier"  # what the harness records as the judge
    return judge


def _read_questions(directory: Path) -> list[dict]:
    path = directory / FILES["questions"] if directory.is_dir() else directory
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tiny-world question file")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
    print(f"tiny world written to {out}: pairs {summary['pairs']}, SFT {summary['sft']}, "
          f"{summary['questions']} questions, vocabulary {summary['vocab_size']}")
    return 0
