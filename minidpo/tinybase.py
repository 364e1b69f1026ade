"""The tiny world's base model and preference sets, built from the world and measured.

`prepare(directory, config)` runs four stages, each written atomically under a folder keyed by a
digest of `config` (so a changed knob rebuilds, and a kill mid-build redoes only what was not
finished):

    world/    `minidpo.tinyworld.write_world`: tokenizer, model config, SFT data, benchmark, dev
    base/     a random tiny Mistral fine-tuned (SFT) on the sloppy demonstrator's conversations
    pairs/    the three preference sets, sampled from the base itself and graded by the verifier
    report.json   what the base gets right and wrong on the dev questions, what the pairs contrast,
                  and how often the base already prefers the chosen reply of held-out pairs

Pairs come from the base's own replies, so that the rejected side is what the base really does:
for each prompt the base answers greedily and by `samples` draws at temperature 1; a prompt on
which every reply is right gives no pair. chosen is a right reply of the base (the verifier's
correct reply when it has none), rejected its most frequent wrong one (the greedy reply when that
is wrong). The sets differ as the paper's do:

    A capybara        two-turn conversations; the pair is on the follow-up, whose context is the
                      base's own greedy turn-1 reply, and which the verifier grades against it
    B orca            one turn under a system prompt
    C ultrafeedback   one turn, the largest set; `label_noise` of its pairs swap the labels and
                      `near_ties` pair two replies equally right or wrong, ratings a hair apart

`RECIPE` (the tiny preset's DPO: TrainConfig fields) and `GENERATION` (answer_questions keywords)
were chosen on the dev questions only; the README says how.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
from pathlib import Path

from minidpo import tinyworld
from minidpo.files import read_json, write_atomic, write_json, write_jsonl
from minidpo.questions import load_answers
from minidpo.tinyworld import WorldConfig

VERSION = 2  # bump when a stage's code changes what it writes: every digest changes with it
SETS = tuple(tinyworld.PAPER_SIZES)  # capybara (A), orca (B), ultrafeedback (C)
GENERATION = {"max_new_tokens": 16, "temperature": 0.0}
# Chosen on the dev questions of the default world (one seed, 100% pooled; README "The tiny
# world"): plain DPO (rpo_alpha 0) unlearns the end of turn and collapses (3% right); the chosen
# replies' NLL at weight 1 keeps it; beta 0.3, rpo_alpha 0.3/0.5/2, lr 5e-3 did no better, 3 epochs
# within noise at 1.5x the time.
RECIPE = {"beta": 0.1, "loss": "sigmoid", "lr": 2e-3, "epochs": 2, "rpo_alpha": 1.0, "lora_r": 16,
          "lora_alpha": 32.0, "lora_dropout": 0.0, "batch_size": 16, "max_length": 128,
          "max_prompt_length": 96, "warmup_ratio": 0.1, "schedule": "cosine", "template": "chatml"}
HELD_OUT_PAIRS = 0.1  # extra pairs per set, never trained on: the report's reward accuracy
SAMPLE_BATCH = 256  # prompts decoded together while sampling pairs
MAX_ROUNDS = 30  # prompt batches tried per set before the verifier's wrong reply stands in


def digest(config: WorldConfig) -> str:
    """sha256 of the config and VERSION: the key of every stage's output."""
    text = json.dumps({"version": VERSION, "config": dataclasses.asdict(config)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _stage(final: Path, build, log, what: str) -> Path:
    """Build folder `final` through `final.tmp` (removed first) and one rename, unless it exists."""
    if final.is_dir():
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"tiny world: {what}")
    build(tmp)
    os.replace(tmp, final)
    return final


def prepare(directory, config: WorldConfig = WorldConfig(), log=print) -> dict:
    """Build (or reuse) the world, base, pairs and report for `config` under `directory/<digest>`.

    Returns {"base": HF folder, "capybara"/"orca"/"ultrafeedback": `minidpo.data` sources,
    "benchmark"/"dev": question files, "report": report.json, "digest", "base_digest", "world":
    the folder `verifier_judge` reads}. `directory/report.json` is a copy of the latest report.
    """
    directory = Path(directory)
    key = digest(config)
    root = directory / key[:16]
    root.mkdir(parents=True, exist_ok=True)
    with locked(directory / f"{key[:16]}.lock"):  # two sweeps building one world wait for each other
        return _prepare(directory, root, config, key, log)


@contextlib.contextmanager
def locked(path: Path):
    """Hold an exclusive lock on the file `path` (created if missing) while the block runs."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare(directory: Path, root: Path, config: WorldConfig, key: str, log) -> dict:
    world = _stage(root / "world", lambda tmp: tinyworld.write_world(tmp, config), log, "writing the world")
    base = _stage(root / "base", lambda tmp: warm_start(world, root / "sft", tmp, config, log), log,
                  "SFT of the base on the sloppy demonstrator")
    pairs = _stage(root / "pairs", lambda tmp: write_pairs(world, base, tmp, config, log), log,
                   "sampling the preference pairs from the base")
    report = root / "report.json"
    if not report.is_file():
        log("tiny world: measuring the base on the dev questions")
        write_json(report, measure(world, base, pairs, config, key))
    write_atomic(directory / "report.json", report.read_bytes())
    paths = {name: f"{pairs / (name + '.jsonl')}::{name}" for name in SETS}
    return {**paths, "base": base, "benchmark": world / tinyworld.FILES["questions"],
            "dev": world / tinyworld.FILES["dev"], "report": report, "digest": key, "base_digest": key,
            "world": world}


# ---------------------------------------------------------------------------------------------
# The base: SFT from random weights
# ---------------------------------------------------------------------------------------------

def warm_start(world: Path, sft_dir: Path, out: Path, config: WorldConfig, log) -> None:
    """Random tiny Mistral -> SFT on the demonstrator's conversations -> HF folder `out`.
    `sft_dir` keeps checkpoints, so a killed build resumes the SFT where it stopped."""
    import minidpo
    from minidpo.train import TrainConfig, train

    model_dir = world / tinyworld.FILES["model"]
    init = sft_dir.parent / "init"
    if not (init / "model.safetensors").is_file():
        mc = minidpo.MistralConfig.from_json(model_dir / "config.json")
        minidpo.save_model(minidpo.Mistral(mc).init_weights(seed=config.seed), init)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(model_dir / name, init / name)
    train(TrainConfig(model=str(init), data=[f"{world / tinyworld.FILES['sft']}::sft"], out=str(sft_dir),
                      mode="sft", full=True, lr=config.sft_lr, epochs=config.sft_epochs, batch_size=32,
                      max_length=128, max_prompt_length=96, warmup_ratio=0.05, seed=config.seed,
                      save_every=100, resume=True, template="chatml", log_every=100))
    shutil.copytree(sft_dir / "final", out, dirs_exist_ok=True)


# ---------------------------------------------------------------------------------------------
# Sampling the base
# ---------------------------------------------------------------------------------------------

class Sampler:
    """The base model answering chat prompts, greedily or by seeded draws at temperature 1."""

    def __init__(self, base: Path, seed: int):
        from minidpo.generate import load_for_generation

        self.model, self.tok = load_for_generation(str(base), template="chatml")
        self.seed = seed

    def __call__(self, conversations: list[list[dict]], temperature: float, salt: int = 0) -> list[str]:
        from minidpo.generate import generate, mix_seed

        prompts = [self.tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
                   for m in conversations]
        seeds = [mix_seed(self.seed, salt, i) for i in range(len(prompts))]
        new = generate(self.model, prompts, max_new_tokens=GENERATION["max_new_tokens"],
                       stop_ids=self.tok.stop_ids, pad_id=self.tok.pad_id, temperature=temperature,
                       seed=seeds, batch_size=SAMPLE_BATCH)
        return [self.tok.decode(ids, skip_special_tokens=True).strip() for ids in new]


def _prompt(name: str, task, system: str | None, context: list[str]) -> list[dict]:
    """The chat the base answers for a pair of set `name` (A: turn 1 and the base's own reply first)."""
    messages = [{"role": "system", "content": system}] if system else []
    if name == "capybara":
        messages += [{"role": "user", "content": task.turns[0]}, {"role": "assistant", "content": context[0]}]
    return messages + [{"role": "user", "content": task.turns[-1]}]


def _candidates(sampler: Sampler, name: str, tasks, systems, contexts, config, salt) -> list[list[str]]:
    """Per task: the greedy reply, then `samples` draws at temperature 1."""
    chats = [_prompt(name, t, s, c) for t, s, c in zip(tasks, systems, contexts)]
    greedy = sampler(chats, 0.0)
    draws = sampler([c for c in chats for _ in range(config.samples)], 1.0, salt)
    k = config.samples
    return [[g] + draws[i * k:(i + 1) * k] for i, g in enumerate(greedy)]


def _graded(task, context, replies) -> tuple[list[str], list[str]]:
    """(right, wrong) replies, the follow-up graded against the base's own turn-1 reply."""
    turns = list(task.turns)
    right = [r for r in replies if r and tinyworld.check_answer(turns, len(turns), r, context)]
    wrong = [r for r in replies if r and r not in right]
    return right, wrong


def _pair(task, context, replies) -> dict | None:
    """chosen/rejected (and what they are) from the base's graded replies; None if it is never wrong."""
    right, wrong = _graded(task, context, replies)
    if not wrong:
        return None
    oracle = tinyworld.solve(list(task.turns), context)[-1]
    chosen = right[0] if right else oracle
    rejected = collections.Counter(wrong).most_common(1)[0][0]
    return {"chosen": chosen, "rejected": rejected, "chosen_from": "base" if right else "verifier",
            "wrong": wrong, "right": right, "oracle": oracle}


def _row(name: str, task, system, context, pair: dict, rng: random.Random, config: WorldConfig) -> tuple[dict, str]:
    """The set's row for `pair`, and its kind: clean, swapped (label noise) or near-tie (C only)."""
    chosen, rejected, kind = pair["chosen"], pair["rejected"], "clean"
    ratings = (rng.choice((4.25, 4.5, 4.75, 5.0)), rng.choice((1.5, 2.0, 2.5, 3.0, 3.5)))
    if name == "ultrafeedback":
        draw = rng.random()
        others = [w for w in pair["wrong"] if w != rejected]
        if draw < config.label_noise:
            chosen, rejected, kind = rejected, chosen, "swapped"
        elif draw < config.label_noise + config.near_ties and others:
            # Two wrong replies, rated a hair apart: a binarised rating set's near-tie carries no signal.
            chosen, rejected, kind = others[0], rejected, "near-tie"
            ratings = (3.0, 2.75)
        elif draw < config.label_noise + config.near_ties:
            alt = tinyworld.plausible_wrong(list(task.turns))[-1]
            if alt != rejected and not tinyworld.check_answer(list(task.turns), 1, alt):
                chosen, rejected, kind = alt, rejected, "near-tie"
                ratings = (3.0, 2.75)
    if name == "capybara":
        # Capybara rates 1-5 in whole steps: chosen 4 or 5, rejected 1 to 3 (never a tie).
        row = tinyworld.capybara_row(list(task.turns), context, chosen, rejected,
                                     (math.floor(ratings[0]), min(3, math.floor(ratings[1]))), task.family)
    elif name == "orca":
        row = tinyworld.orca_row(system, task.turns[0], chosen, rejected)
    else:
        row = tinyworld.ultrafeedback_row(task.turns[0], chosen, rejected, ratings, task.family)
    return row, kind


def sample_set(sampler: Sampler, name: str, count: int, held_out: set[str], config: WorldConfig, log):
    """`count` rows of set `name` from the base's own replies; returns (rows, facts per row)."""
    turns = 2 if name == "capybara" else 1
    stream = tinyworld.task_stream(config, f"pairs-{name}", turns, held_out)
    rng = random.Random(f"tinybase:{config.seed}:{name}")
    rows, facts = [], []
    for round_ in range(MAX_ROUNDS + 1):
        if len(rows) >= count:
            break
        tasks = [next(stream) for _ in range(max(64, 2 * (count - len(rows))))]
        systems = [rng.choice(tinyworld.SYSTEM_PROMPTS) if name == "orca" else None for _ in tasks]
        contexts = ([[r] for r in sampler([[{"role": "user", "content": t.turns[0]}] for t in tasks], 0.0)]
                    if name == "capybara" else [[] for _ in tasks])
        replies = _candidates(sampler, name, tasks, systems, contexts, config, salt=round_)
        for task, system, context, cands in zip(tasks, systems, contexts, replies):
            pair = _pair(task, context, cands)
            if pair is None and round_ == MAX_ROUNDS:  # the base is right here: the demonstrator's slip
                pair = {"chosen": cands[0], "rejected": tinyworld.plausible_wrong(list(task.turns), context)[-1],
                        "chosen_from": "base", "wrong": [], "right": cands, "oracle": cands[0],
                        "rejected_from": "verifier"}
            if pair is None or len(rows) >= count:
                continue
            row, kind = _row(name, task, system, context, pair, rng, config)
            rows.append(row)
            facts.append({"family": task.family, "turn": turns, "kind": kind, "chosen_from": pair["chosen_from"],
                          "rejected_from": pair.get("rejected_from", "base"),
                          "systematic": pair["rejected"] == tinyworld.plausible_wrong(list(task.turns), context)[-1],
                          "weak": tinyworld.weak_turns(list(task.turns), context)[-1],
                          "greedy_wrong": cands[0] in pair["wrong"]})
        log(f"  {name}: {len(rows)}/{count} pairs after {round_ + 1} batch(es) of prompts")
    return rows, facts


def write_pairs(world: Path, base: Path, out: Path, config: WorldConfig, log) -> None:
    """The three sets (sizes in the paper's ratio) and held-out pairs of each, under `out`."""
    held_out = {q["turns"][0] for w in ("questions", "dev") for q in tinyworld._read_questions(world, w)}
    sampler = Sampler(base, config.seed)
    composition = {}
    for name, size in tinyworld.split_sizes(config.total_pairs).items():
        extra = max(20, round(HELD_OUT_PAIRS * size))
        rows, facts = sample_set(sampler, name, size + extra, held_out, config, log)
        write_jsonl(out / f"{name}.jsonl", rows[:size])
        write_jsonl(out / "held_out" / f"{name}.jsonl", rows[size:])
        composition[name] = _composition(facts[:size])
    write_json(out / "composition.json", composition)


def _composition(facts: list[dict]) -> dict:
    """Counts of what a set's pairs contrast."""
    count = collections.Counter
    return {"pairs": len(facts), "kind": dict(count(f["kind"] for f in facts)),
            "chosen_from": dict(count(f["chosen_from"] for f in facts)),
            "rejected_from": dict(count(f["rejected_from"] for f in facts)),
            "rejected_systematic": sum(f["systematic"] for f in facts),
            "rejected_is_greedy": sum(f["greedy_wrong"] for f in facts),
            "weak": sum(f["weak"] for f in facts), "turn": dict(count(str(f["turn"]) for f in facts)),
            "family": dict(count(f["family"] for f in facts)),
            "rejected_kinds": dict(count(_kind(f["family"], f["turn"], f["systematic"])
                                         for f in facts if f["kind"] == "clean"))}


def _kind(family: str, turn: int, systematic: bool) -> str:
    """A mistake's kind: task family, turn, and whether it is the demonstrator's systematic slip."""
    return f"{family}/turn {turn}/{'systematic' if systematic else 'other'}"


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def dev_answers(world: Path, base: Path, out_path: Path) -> Path:
    """The base's answers to the dev questions (GENERATION's settings), as the sweep answers."""
    from minidpo.generate import answer_questions, load_for_generation

    model, tok = load_for_generation(str(base), template="chatml")
    answer_questions(model, tok, world / tinyworld.FILES["dev"], model_id="base", out_path=out_path,
                     batch_size=64, progress=False, **GENERATION)
    return out_path


def _mistakes(world: Path, answers_path: Path) -> dict:
    """What the base's wrong dev answers are: the demonstrator's systematic slip, on a weak turn or not."""
    questions = tinyworld._read_questions(world, "dev")
    answers = {qid: list(a.turns) for qid, a in load_answers(answers_path).items()}
    out, kinds = collections.Counter(), collections.Counter()
    for q in questions:
        replies = answers[q["question_id"]]
        for k in range(len(q["turns"])):
            turns, previous = q["turns"][:k + 1], replies[:k]
            weak = tinyworld.weak_turns(turns, previous)[k]
            out[f"turns_{'weak' if weak else 'other'}"] += 1
            if tinyworld.check_answer(turns, k + 1, replies[k], previous):
                out[f"right_{'weak' if weak else 'other'}"] += 1
                continue
            systematic = tinyworld.normalize(replies[k]) == tinyworld.normalize(
                tinyworld.plausible_wrong(turns, previous)[k])
            out["wrong"] += 1
            out["wrong_systematic"] += systematic
            out["wrong_on_weak"] += weak
            kinds[_kind(tinyworld.FAMILY[q["category"]], k + 1, systematic)] += 1
    return {**out, "kinds": dict(kinds)}


def _coverage(mistakes: dict, composition: dict) -> dict:
    """Share of the base's dev mistakes of a kind that a set's clean pairs contrast (reject)."""
    total = sum(mistakes["kinds"].values()) or 1
    out = {}
    for name, sets in [*((n, [n]) for n in SETS), ("pooled", list(SETS))]:
        seen = {k for n in sets for k in composition[n]["rejected_kinds"]}
        out[name] = sum(v for k, v in mistakes["kinds"].items() if k in seen) / total
    return out


def reward_accuracy(base: Path, source: str) -> dict:
    """How often the base gives the chosen reply more log-probability than the rejected one
    (DPO's reward accuracy at step 0 is undefined; this is what DPO must move)."""
    import torch

    from minidpo.checkpoint import load_model
    from minidpo.data import load_pairs, tokenize_pairs
    from minidpo.tokenizer import load_tokenizer
    from minidpo.batching import make_batch
    from minidpo.scoring import batch_logps

    tok = load_tokenizer(str(base), template="chatml")
    model = load_model(str(base)).eval()
    pairs, _ = load_pairs([source])
    tokenized, _ = tokenize_pairs(pairs, tok, max_length=RECIPE["max_length"],
                                  max_prompt_length=RECIPE["max_prompt_length"])
    wins = 0
    with torch.no_grad():
        for start in range(0, len(tokenized), 64):
            idx = list(range(start, min(start + 64, len(tokenized))))
            logps = batch_logps(model, make_batch(tokenized, idx, tok.pad_id, "cpu"))
            wins += int((logps[:len(idx)] > logps[len(idx):]).sum())
    return {"pairs": len(tokenized), "chosen_preferred": wins / max(1, len(tokenized))}


def measure(world: Path, base: Path, pairs: Path, config: WorldConfig, key: str) -> dict:
    """report.json: the base on the dev questions, the pairs' composition, held-out reward accuracy."""
    answers = dev_answers(world, base, pairs.parent / "dev_answers.jsonl")
    score = tinyworld.score_answers(world / tinyworld.FILES["dev"], answers)
    score.pop("per_question")
    mistakes = _mistakes(world, answers)
    composition = read_json(pairs / "composition.json")
    held = {name: reward_accuracy(base, f"{pairs / 'held_out' / (name + '.jsonl')}::{name}") for name in SETS}
    summary = read_json(world / tinyworld.FILES["world"])
    return {"digest": key, "config": dataclasses.asdict(config), "generation": GENERATION,
            "sft": summary["sft"], "base_on_dev": score, "base_mistakes_on_dev": mistakes,
            "mistakes_of_a_kind_the_pairs_contrast": _coverage(mistakes, composition),
            "pairs": composition, "held_out_reward_accuracy": held}


def summary_lines(report: dict) -> list[str]:
    """A few lines of the report for the demo's output."""
    dev, m = report["base_on_dev"], report["base_mistakes_on_dev"]
    lines = [f"base on {dev['n']} dev question-turns: {dev['accuracy']:.1%} right "
             f"(turn 1 {dev['turn_1']:.1%}, turn 2 {dev['turn_2']:.1%})",
             f"  its mistakes: {m.get('wrong', 0)}, of which the demonstrator's systematic slip "
             f"{m.get('wrong_systematic', 0)}, on a weak turn {m.get('wrong_on_weak', 0)}; of a kind the "
             f"pooled pairs contrast {report['mistakes_of_a_kind_the_pairs_contrast']['pooled']:.1%}"]
    for name, c in report["pairs"].items():
        held = report["held_out_reward_accuracy"][name]["chosen_preferred"]
        lines.append(f"  {name}: {c['pairs']} pairs {c['kind']}, rejected = the base's greedy reply in "
                     f"{c['rejected_is_greedy']}; base prefers chosen on held-out pairs {held:.1%}")
    return lines
