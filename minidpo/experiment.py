"""The paper's two experiments (arXiv 2410.16586): DPO on more or less data, and on each data type.

Each row of a sweep trains LoRA DPO from the base model, answers the benchmark with it and judges it
pairwise against the base (both answer orders, ties); on the tiny preset the verifier also scores
each model's answers alone (absolute accuracy, as MT-Bench's single-answer mode sits next to its
pairwise mode):

    volume   pool the three preference sets, train on nested 20/40/60/80/100% subsets
    type     train on each set alone (A conversational, B and C question answering)

Two presets run through the same code: `tiny` (default) is the offline tiny world of
`minidpo.tinybase` with its verifier judge; `paper` is OpenHermes-2.5-Mistral-7B, the three hub
datasets, MT-Bench's 80 questions with FastChat's judge prompts and references, MT-Bench's
generation settings, and an OpenAI-compatible judge.

Nothing stale. Every stage writes under CACHE (default runs/cache), in a place named by a digest
of its inputs, so that changing a knob recomputes what depends on it and reuses the rest:

    world    tinybase.prepare, keyed by the WorldConfig (the `digest` it returns)
    train    CACHE/train/<key>/          the base's digest, the row's data files' contents, every
                                         TrainConfig setting that changes the weights (preset
                                         recipe + command-line flags, fraction, seed)
    answers  CACHE/answers/<key>.jsonl   the weights' key, the questions' text, the generation
                                         settings
    judge    CACHE/judge/<key>/          the contents of the two answer sets and their model ids,
                                         the judge, the prompt set, the questions and their
                                         references (minidpo.judge keys each request again by
                                         the SHA-256 of its text)

OUT/results.json, results.md, plot.png, curves.png (and curves.json, the data it draws) are written from those stages on every run;
each run's `computed` lists the stages it had to compute this time, `digests` their keys.
"""
import argparse
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minidpo import intervals
from minidpo.files import read_json, write_atomic, write_json
# Two sweeps sharing a cache (a tuning run beside the demo) wait for each other's stage instead of
# writing one folder together.
from minidpo.tinybase import SETS  # the paper's three sets, as minidpo.data names them
from minidpo.tinybase import locked as _locked

PAPER_BASE = "teknium/OpenHermes-2.5-Mistral-7B"
# The paper states no hyperparameters: these are our choices, written in the README.
PAPER_TRAIN = {"beta": 0.1, "lora_r": 16, "lora_alpha": 16.0, "lora_dropout": 0.05, "lr": 5e-5,
               "schedule": "cosine", "warmup_ratio": 0.1, "epochs": 1, "batch_size": 16,
               "max_length": 1024, "max_prompt_length": 512, "template": "chatml"}
# Under every preset: each pair's reference log-probs computed once for the whole sweep, and
# checkpoints often enough that a crash loses little of a row.
SWEEP_TRAIN = {"reference": "precomputed", "save_every": 50}
# TrainConfig fields the sweep sets for each row itself: no flag.
ROW_FIELDS = ("model", "data", "out", "mode", "fraction", "seed", "resume", "dry_run", "device_memory",
              "ref_cache_dir")
# TrainConfig fields that do not change the trained weights: left out of the training key.
BOOKKEEPING = ("model", "data", "out", "resume", "dry_run", "device_memory", "ref_cache_dir", "save_every",
               "keep_checkpoints", "log_every", "report_to", "dist_timeout")
ANSWER_BATCH = 16  # questions decoded together
BOOTSTRAP_SAMPLES = 2000
TURNS, ORDERS = 2, 2  # MT-Bench: two turns a question, each judged in both answer orders


def _option(default, help, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ExperimentConfig:
    """One sweep. Fields become `--flags` of the example scripts and of `demo`; `train` holds the
    TrainConfig settings given on the command line, applied over the preset's recipe."""

    experiment: str = _option("volume", "volume (nested fractions of the pooled sets) or type (each set "
                                        "alone)", choices=("volume", "type"))
    preset: str = _option("tiny", "tiny (offline tiny world, minutes on a CPU) or paper (OpenHermes-2.5, "
                                  "hub data, MT-Bench, an OpenAI-compatible judge)", choices=("tiny", "paper"))
    split: str = _option("benchmark", "tiny preset: answer and judge the benchmark questions, or the dev "
                                      "questions (another random stream; tune on these, never on the "
                                      "benchmark)", choices=("benchmark", "dev"))
    seeds: int = _option(1, "DPO seeds per row (0..K-1); with K >= 2 each number gets its spread over "
                            "seeds (mean +- t-quantile interval)")
    world_seed: int = _option(0, "tiny preset: the world's seed (its data, base model and questions)")
    benchmark_questions: int = _option(0, "tiny preset: benchmark questions, in MT-Bench's shape (8 "
                                          "categories, 2 turns, ids from 81); 0: the world's default")
    world_pairs: int = _option(0, "tiny preset: preference pairs in the world, A + B + C (0: the world's "
                                  "default)")
    sft_size: int = _option(0, "tiny preset: SFT demonstrations of the base's warm start (0: the world's "
                               "default)")
    fractions: str = _option("0.2,0.4,0.6,0.8,1.0", "volume experiment: the nested fractions, "
                                                    "comma-separated")
    out: str = _option("", "results folder (default: runs/<experiment>, -dev for --split dev, -world-N "
                           "for --world-seed N)")
    cache: str = _option("runs/cache", "digest-keyed stage outputs (adapters, answers, judgments), shared "
                                       "by every sweep")
    world: str = _option("runs/tinyworld", "tiny preset: where the world and its base model are built")
    greedy: bool = _option(False, "decode greedily instead of the preset's generation settings (paper: "
                                  "MT-Bench's per-category temperatures, seeded)")
    judge: str = _option("openai", "paper preset: openai (an OpenAI-compatible endpoint) or local (a "
                                   "minidpo model folder)", choices=("openai", "local"))
    judge_model: str = _option("gpt-4", "paper preset: judge model name (openai) or folder (local)")
    judge_base_url: str = _option("https://api.openai.com/v1", "paper preset: OpenAI-compatible API root")
    judge_prompts: str = _option("", "judge prompts: a FastChat judge_prompts.jsonl, 'fastchat' (the pinned "
                                     "file) or 'builtin' (default: paper fastchat, tiny builtin)")
    references: str = _option("", "reference answers for math/reasoning/coding: a FastChat answers file, "
                                  "'fastchat' (reference_answer/gpt-4.jsonl, pinned) or 'none' (default: "
                                  "paper fastchat, tiny the world's own)")
    workers: int = _option(4, "paper preset: concurrent judge requests")
    threads: int = _option(0, "torch CPU threads (0: one for the tiny preset, whose ~1M-parameter matmuls "
                              "a second thread only slows down, most on a busy machine; torch's default "
                              "for the paper preset)")
    dry_run: bool = _option(False, "print the plan (model, data, settings, judge, requests) and stop; "
                                   "downloads and writes nothing")
    train: dict = field(default_factory=dict, metadata={"help": None})  # TrainConfig field -> value
    world_overrides: dict = field(default_factory=dict, metadata={"help": None})  # other WorldConfig fields (Python API)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"--{f.name.replace('_', '-')} must be one of {list(choices)}, "
                                 f"got {getattr(self, f.name)!r}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")
        for name in ("seeds", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("benchmark_questions", "world_pairs", "sft_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.preset == "paper" and self.split != "benchmark":
            raise ValueError("--split dev is the tiny preset's (MT-Bench has no dev questions)")
        bad = set(self.train) & set(ROW_FIELDS)
        if bad:
            raise ValueError(f"train settings {sorted(bad)} are set by the sweep for each row")
        if not self.out:
            self.out = f"runs/{self.experiment}" + ("-dev" if self.split == "dev" else "") + \
                (f"-world-{self.world_seed}" if self.world_seed else "")
        try:
            self.fraction_values = tuple(float(f) for f in self.fractions.split(","))
        except ValueError as e:
            raise ValueError(f"--fractions must be comma-separated numbers, got {self.fractions!r}") from e
        if not all(0 < f <= 1 for f in self.fraction_values):
            raise ValueError(f"--fractions must lie in (0, 1], got {self.fractions!r}")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def digest(*parts) -> str:
    """SHA-256 of JSON-able parts: the key of a stage's output."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Presets: what a sweep trains, on what, and how it answers and is judged.

@dataclass
class Preset:
    name: str  # tiny or paper
    base: str  # model folder or hub id of the base (the SFT model DPO starts from)
    base_digest: str  # what the base's weights are keyed by
    data: dict  # set name -> source for minidpo.data
    data_digest: dict  # set name -> digest of its contents (a hub id stands for itself)
    questions: str  # questions file, or "mt-bench"
    references: object  # None (the questions' own), a FastChat answers file, or "fastchat"
    judge_prompts: object  # None (built-in), a FastChat judge_prompts.jsonl, or "fastchat"
    train: dict  # the recipe: TrainConfig settings
    generation: dict  # answer_questions settings: max_new_tokens, temperature, top_p
    world: dict = None  # tiny: what tinybase.prepare returned


def world_config(config: ExperimentConfig):
    """The WorldConfig of the tiny preset: its defaults, with the knobs given (0 = keep)."""
    from minidpo.tinyworld import WorldConfig

    given = {"total_pairs": config.world_pairs, "sft_size": config.sft_size,
             "benchmark_questions": config.benchmark_questions}
    return WorldConfig(**{"seed": config.world_seed, **config.world_overrides,
                          **{k: v for k, v in given.items() if v}})


def source_digest(source: str) -> str:
    """A data source's contents: a local file's bytes (and its format); a hub id stands for itself."""
    from minidpo.data import parse_source

    location, fmt = parse_source(source)
    path = Path(location)
    if path.is_file():
        return digest(hashlib.sha256(path.read_bytes()).hexdigest(), fmt)
    return digest(str(source))


def _choice(value: str, default, none_words=("builtin", "none")):
    """A --judge-prompts/--references value: "" -> the preset's default, 'builtin'/'none' -> None."""
    if not value:
        return default
    return None if value in none_words else value


def tiny_preset(config: ExperimentConfig) -> Preset:
    """The tiny world, built (data, SFT base, report) on first use by tinybase.prepare."""
    from minidpo import tinybase

    paths = tinybase.prepare(config.world, world_config(config), log=log)
    data = {name: str(paths[name]) for name in SETS}
    return Preset("tiny", str(paths["base"]), paths["base_digest"], data,
                  {name: source_digest(s) for name, s in data.items()}, str(paths[config.split]),
                  _choice(config.references, None), _choice(config.judge_prompts, None),
                  dict(tinybase.RECIPE), dict(tinybase.GENERATION), paths)


def paper_preset(config: ExperimentConfig) -> Preset:
    """OpenHermes-2.5-Mistral-7B, the hub sets, MT-Bench as FastChat runs it."""
    from minidpo.data import SHORT_NAMES
    from minidpo.generate import DEFAULT_MAX_NEW_TOKENS

    data = {name: SHORT_NAMES[name] for name in SETS}
    generation = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "temperature": "mt-bench", "top_p": 1.0}
    return Preset("paper", PAPER_BASE, digest(PAPER_BASE), data, {n: digest(s) for n, s in data.items()},
                  "mt-bench", _choice(config.references, "fastchat"),
                  _choice(config.judge_prompts, "fastchat"), dict(PAPER_TRAIN), generation)


def make_preset(config: ExperimentConfig) -> Preset:
    return tiny_preset(config) if config.preset == "tiny" else paper_preset(config)


def plan_rows(config: ExperimentConfig) -> list[dict]:
    """The sweep's rows: [{"key", "label", "fraction", "names"} (+ "dataset" for type rows)]."""
    if config.experiment == "volume":
        return [{"key": f"fraction-{f:g}", "label": f"{f:.0%}", "fraction": f, "names": list(SETS)}
                for f in config.fraction_values]
    return [{"key": f"dataset-{n}", "label": n, "dataset": n, "fraction": 1.0, "names": [n]} for n in SETS]


def train_settings(preset: Preset, config: ExperimentConfig, row: dict, seed: int):
    """The row's TrainConfig (model, data, out left to fill) and its settings: the sweep's defaults,
    the preset's recipe, the command line's flags, then the row's fraction and seed."""
    from minidpo.config import TrainConfig

    given = {**SWEEP_TRAIN, **preset.train, **config.train, "fraction": row["fraction"], "seed": seed}
    probe = TrainConfig(model=preset.base, data=[preset.data[n] for n in row["names"]], out="-", **given)
    settings = {k: v for k, v in dataclasses.asdict(probe).items() if k not in BOOKKEEPING}
    return given, settings


def generation_settings(preset: Preset, config: ExperimentConfig, seed: int) -> dict:
    """answer_questions settings; sampled answers are seeded (greedy ones need no seed)."""
    gen = dict(preset.generation)
    if config.greedy:
        gen["temperature"] = 0.0
    gen.pop("seed", None)
    if gen.get("temperature", 0.0) != 0:
        gen["seed"] = seed
    return gen


# ---------------------------------------------------------------------------------------------------
# Stages: each returns what it made, its key and whether it had to compute it this time.

@dataclass
class Sweep:
    """What every stage of one sweep shares."""
    config: ExperimentConfig
    preset: Preset
    questions: list  # minidpo.questions.Question, references included
    questions_digest: str  # what the models are asked (answers depend on it)
    references_digest: str  # what the judge is shown besides (judgments depend on it too)
    judge: object
    cache: Path


def load_benchmark(preset: Preset):
    """The questions the sweep answers (with references), the digest of their text, and the digest
    of their references."""
    from minidpo.questions import load_questions

    questions = load_questions(preset.questions, references=preset.references)
    return (questions, digest([[q.question_id, q.category, list(q.turns)] for q in questions]),
            digest([[q.question_id, list(q.reference or ())] for q in questions]))


def train_stage(sweep: Sweep, row: dict, seed: int) -> dict:
    """LoRA DPO for one row and seed, or the adapter an earlier run with the same key trained."""
    preset = sweep.preset
    given, settings = train_settings(preset, sweep.config, row, seed)
    key = digest("train", preset.base_digest, [preset.data_digest[n] for n in row["names"]], settings)
    folder = sweep.cache / "train" / key[:16]
    with _locked(folder.with_name(folder.name + ".lock")):
        return _train_locked(sweep, row, seed, given, settings, key, folder)


def _train_locked(sweep, row, seed, given, settings, key, folder) -> dict:
    from minidpo.train import TrainConfig, train

    preset, done = sweep.preset, folder / "done.json"
    computed = not done.is_file()
    if computed:
        log(f"{row['key']} seed {seed}: training ({key[:12]})")
        result = train(TrainConfig(model=preset.base, data=[preset.data[n] for n in row["names"]],
                                   out=str(folder / "run"), ref_cache_dir=str(sweep.cache / "reference"),
                                   resume=True, **given))
        if result["status"] != "finished":
            raise SystemExit(f"training of {row['key']} seed {seed} was {result['status']}; run the same "
                             f"command again to resume it")
        write_json(done, {"key": key, "train_pairs": result["train_pairs"], "settings": settings,
                           "final": str(Path(result["final"]).resolve().relative_to(folder.resolve()))})
    else:
        log(f"{row['key']} seed {seed}: training reused ({key[:12]})")
    info = read_json(done)
    return {"key": key, "computed": computed, "pairs": info["train_pairs"], "settings": settings,
            "adapter": folder / info["final"], "metrics": folder / "run" / "metrics.jsonl"}


def answers_stage(sweep: Sweep, *, weights: str, model_id: str, seed: int, lora=None) -> dict:
    """The model's answers to every question: reused when a file of the same key holds them all."""
    from minidpo.generate import answer_questions, load_for_generation, read_answered

    gen = generation_settings(sweep.preset, sweep.config, seed)
    key = digest("answers", weights, sweep.questions_digest, gen)
    path = sweep.cache / "answers" / f"{key[:16]}.jsonl"
    with _locked(path.with_suffix(".lock")):
        computed = not {q.question_id for q in sweep.questions} <= read_answered(path, model_id)
        if computed:
            log(f"{model_id}: answering {len(sweep.questions)} questions ({key[:12]})")
            model, tok = load_for_generation(sweep.preset.base, lora=lora,
                                             template=sweep.preset.train.get("template") or None)
            answer_questions(model, tok, sweep.questions, model_id=model_id, out_path=path,
                             batch_size=ANSWER_BATCH, progress=True, **gen)
        else:
            log(f"{model_id}: answers reused ({key[:12]})")
    return {"key": key, "computed": computed, "path": path, "generation": gen, "model_id": model_id,
            "content": answers_digest(path)}


def answers_digest(path: Path) -> str:
    """The answers' text, question by question (ids and time stamps of the records left out)."""
    from minidpo.questions import load_answers

    answers = load_answers(path)
    return digest(sorted([str(qid), list(a.turns)] for qid, a in answers.items()))


def judge_stage(sweep: Sweep, mine: dict, base: dict) -> dict:
    """Pairwise judgments of `mine` against the base; judge_pairwise asks only for what is missing."""
    from minidpo.judge import JUDGMENTS_FILE, judge_pairwise, question_turn_outcomes, read_judgments
    from minidpo.judge_prompts import load_prompts

    prompts = load_prompts(sweep.preset.judge_prompts)
    name = getattr(sweep.judge, "judge_name", "callable")
    # the model ids too: judge_pairwise keeps one folder per pair of models
    key = digest("judge", mine["content"], base["content"], mine["model_id"], base["model_id"], name,
                 prompts.sha256, sweep.questions_digest, sweep.references_digest)
    folder = sweep.cache / "judge" / key[:16]
    with _locked(folder.with_name(folder.name + ".lock")):
        before = len(read_judgments(folder / JUDGMENTS_FILE))
        summary = judge_pairwise(sweep.questions, mine["path"], base["path"], sweep.judge, folder,
                                 prompts=prompts, workers=sweep.config.workers if sweep.preset.name == "paper" else 1,
                                 progress=sweep.preset.name == "paper")
        records = [r for _, r in read_judgments(folder / JUDGMENTS_FILE)]
    log(f"{mine['model_id']} vs base: " + (f"judged ({key[:12]})" if len(records) > before
                                          else f"judgments reused ({key[:12]})"))
    outcomes = question_turn_outcomes(sweep.questions, records)  # later records supersede earlier ones
    per_question = {}
    for (qid, _), outcome in outcomes.items():
        counts = per_question.setdefault(str(qid), [0, 0, 0, 0])
        counts[("win", "tie", "loss", "error").index(outcome)] += 1
    return {"key": key, "computed": len(records) > before, "summary": summary, "per_question": per_question}


def score_stage(sweep: Sweep, answers: dict):
    """The verifier's single-answer score of one answer set (tiny preset; None for the paper's)."""
    if sweep.preset.world is None:
        return None
    from minidpo.tinyworld import score_answers

    score = score_answers(sweep.preset.questions, answers["path"])
    out = {k: score[k] for k in ("accuracy", "turn_1", "turn_2", "n")}
    # [right, graded] per question, for the bootstrap over questions
    out["per_question"] = {str(q): [sum(ok), len(ok)] for q, ok in score["per_question"].items()}
    return out


def run_one(sweep: Sweep, row: dict, seed: int, base: dict) -> dict:
    """Train, answer, judge and score one (row, seed); the run's record for results.json."""
    trained = train_stage(sweep, row, seed)
    mine = answers_stage(sweep, weights=trained["key"], model_id=f"dpo-{trained['key'][:12]}", seed=seed,
                         lora=trained["adapter"])
    judged = judge_stage(sweep, mine, base)
    s = judged["summary"]
    stages = {"train": trained, "answers": mine, "judge": judged}
    return {"seed": seed, "pairs": trained["pairs"], "settings": trained["settings"],
            "generation": mine["generation"], "digests": {k: v["key"] for k, v in stages.items()},
            "computed": [k for k, v in stages.items() if v["computed"]],
            **{k: s[k] for k in ("wins", "ties", "losses", "errors", "question_turns", "win_rate",
                                 "adjusted_win_rate")},
            "net_win": intervals.net_win([s["wins"], s["ties"], s["losses"]]),
            "judge": {k: s.get(k) for k in ("judge", "prompts", "references")},
            "per_question": judged["per_question"], "score": score_stage(sweep, mine),
            "metrics": str(trained["metrics"])}


# ---------------------------------------------------------------------------------------------------
# Aggregation over seeds: seed spread and question bootstrap, each in its own field.

def _stacked(runs: list[dict], key: str, width: int):
    """Per-question counts summed over the runs (a question's outcomes in every seed stay together)."""
    ids = sorted({q for r in runs for q in (r.get(key) or {})}, key=str)
    return np.array([[sum((r.get(key) or {}).get(q, [0] * width)[c] for r in runs) for c in range(width)]
                     for q in ids], dtype=np.float64).reshape(-1, width)


def _spread(out: dict, name: str, values: list):
    """Mean, sd and seed interval of the runs' values; a run with nothing decided (None, NaN: every
    question-turn an error) has no value, and the mean is over the others."""
    values = [v for v in values if v is not None and not np.isnan(v)]
    s = intervals.seed_spread(values) if values else {"mean": None, "sd": None, "interval": None}
    out[name], out[f"{name}_sd"], out[f"{name}_seed_interval"] = s["mean"], s["sd"], s["interval"]
    return s["interval"]


def score_columns(runs: list[dict]) -> dict:
    """Absolute accuracy over seeds: mean, seed spread, question bootstrap (None without a verifier)."""
    scores = [r["score"] for r in runs]
    if any(s is None for s in scores):
        return {"accuracy": None}
    out = {}
    _spread(out, "accuracy", [s["accuracy"] for s in scores])
    for turn in ("turn_1", "turn_2"):
        out[turn] = float(np.mean([s[turn] for s in scores]))
    out["accuracy_interval"] = intervals.question_bootstrap(_stacked(scores, "per_question", 2),
                                                            intervals.accuracy, samples=BOOTSTRAP_SAMPLES)
    return out


def accuracy_gain(runs: list[dict], base_score) -> dict:
    """The row's accuracy minus the base's: seed spread, and a paired question bootstrap (each
    resample draws the same questions for the row, in every seed, and for the base)."""
    if base_score is None or any(r["score"] is None for r in runs):
        return {"accuracy_gain": None}
    out = {}
    _spread(out, "accuracy_gain", [r["score"]["accuracy"] - base_score["accuracy"] for r in runs])
    ids = set(base_score.get("per_question") or ())
    if ids and all(set(r["score"].get("per_question") or ()) == ids for r in runs):
        mine = _stacked([r["score"] for r in runs], "per_question", 2)
        base = _stacked([base_score], "per_question", 2)
        paired = np.concatenate([mine, base], axis=1)  # same question order: both sorted by id
        out["accuracy_gain_interval"] = intervals.question_bootstrap(
            paired, lambda c: c[0] / c[1] - c[2] / c[3], samples=BOOTSTRAP_SAMPLES)
    else:
        out["accuracy_gain_interval"] = None
    return out


def aggregate(row: dict, runs: list[dict], base_score=None) -> dict:
    """One table row from a row's seeds: summed counts; win rate, (W-L)/decided, accuracy and its
    gain over the base, each with its seed spread (`*_seed_interval`, t quantile) and its question
    bootstrap (`interval`, `net_win_interval`, `accuracy_interval`, `accuracy_gain_interval`, pooled
    over seeds)."""
    label = {"fraction": row["fraction"]} if "dataset" not in row else {"dataset": row["dataset"]}
    out = {**label, "key": row["key"], "label": row["label"], "pairs": runs[0]["pairs"], "seeds": len(runs)}
    for k in ("wins", "ties", "losses", "errors", "question_turns"):
        out[k] = sum(r[k] for r in runs)
    out["seeds_ahead"] = sum(r["wins"] > r["losses"] for r in runs)  # seeds in which DPO won more than it lost
    per_question = _stacked(runs, "per_question", 4)
    _spread(out, "win_rate", [r["win_rate"] for r in runs])
    out["interval"] = intervals.question_bootstrap(per_question, intervals.win_rate, samples=BOOTSTRAP_SAMPLES)
    out["net_win"] = intervals.net_win([out["wins"], out["ties"], out["losses"]])  # pooled over seeds
    out["net_win_seed_interval"] = _spread({}, "net_win", [r["net_win"] for r in runs])
    out["net_win_interval"] = intervals.question_bootstrap(per_question, intervals.net_win,
                                                           samples=BOOTSTRAP_SAMPLES)
    out.update(score_columns(runs))
    out.update(accuracy_gain(runs, base_score))
    out["settings"] = runs[0]["settings"]  # the seeds differ in `seed` only (see runs)
    out["runs"] = runs
    return out


# ---------------------------------------------------------------------------------------------------
# Tables and plots.

def _num(x, digits=3):
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"  # x != x: NaN


def _iv(x):
    return "n/a" if x is None else f"[{x[0]:.3f}, {x[1]:.3f}]"


def markdown(rows: list[dict], experiment: str, base_score=None, questions: int = 0) -> str:
    """The pairwise table and, beside it, the absolute-accuracy table (base first)."""
    key = "fraction" if experiment == "volume" else "dataset"
    seeds = rows[0]["seeds"] if rows else 1
    lines = [f"Pairwise against the base, {questions} questions x {TURNS} turns, both answer orders; "
             f"counts summed over {seeds} seed(s). Seed spread: mean over seeds +- t(0.975, K-1) sd / "
             f"sqrt(K) (n/a with one seed). Question bootstrap: {BOOTSTRAP_SAMPLES} resamples of the "
             f"questions (turns and seeds kept together).", "",
             f"| {key} | pairs | seeds | seeds W>L | wins | ties | losses | errors | win rate | seed spread 95% "
             f"| question bootstrap 95% | (W-L)/decided | seed spread 95% | question bootstrap 95% |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['pairs']} | {r['seeds']} | {r['seeds_ahead']} | {r['wins']} | {r['ties']} "
                     f"| {r['losses']} "
                     f"| {r['errors']} | {_num(r['win_rate'])} | {_iv(r['win_rate_seed_interval'])} "
                     f"| {_iv(r['interval'])} | {_num(r['net_win'])} | {_iv(r['net_win_seed_interval'])} "
                     f"| {_iv(r['net_win_interval'])} |")
    if base_score is None and all(r.get("accuracy") is None for r in rows):
        return "\n".join(lines) + "\n"
    lines += ["", "Absolute accuracy (the verifier's single-answer score; turn 2 graded against the model's "
              "own turn 1):", "",
              "| model | seeds | accuracy | seed spread 95% | question bootstrap 95% | turn 1 | turn 2 "
              "| minus base | seed spread 95% | paired question bootstrap 95% |",
              "|---|---:|---:|---|---|---:|---:|---:|---|---|"]
    if base_score is not None:
        lines.append(f"| base | 1 | {_num(base_score['accuracy'])} | n/a | {_iv(base_score.get('interval'))} "
                     f"| {_num(base_score.get('turn_1'))} | {_num(base_score.get('turn_2'))} | | | |")
    for r in rows:
        lines.append(f"| {r['label']} | {r['seeds']} | {_num(r.get('accuracy'))} "
                     f"| {_iv(r.get('accuracy_seed_interval'))} | {_iv(r.get('accuracy_interval'))} "
                     f"| {_num(r.get('turn_1'))} | {_num(r.get('turn_2'))} | {_num(r.get('accuracy_gain'))} "
                     f"| {_iv(r.get('accuracy_gain_seed_interval'))} | {_iv(r.get('accuracy_gain_interval'))} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], experiment: str, path: Path, base_score=None) -> None:
    """Stacked wins/ties/losses per row and, where the verifier scored them, the absolute accuracy
    with its seed spread (or, with one seed, its question bootstrap) against the base's."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed (pip install 'minidpo[plot]'): {path} not drawn")
        return
    labels = [r["label"] for r in rows]
    scored = all(r.get("accuracy") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(11 if scored else 6, 3.8), squeeze=False)
    ax = axes[0][0]
    bottom = [0] * len(rows)
    for name, colour in (("wins", "#2a9d8f"), ("ties", "#bbbbbb"), ("losses", "#e76f51")):
        values = [r[name] for r in rows]
        ax.bar(labels, values, bottom=bottom, color=colour, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("question-turns (summed over seeds)")
    ax.set_title(f"DPO vs base: {experiment} experiment", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    if scored:
        _accuracy_panel(axes[0][1], rows, labels, base_score)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _accuracy_panel(ax, rows, labels, base_score):
    means = [r["accuracy"] for r in rows]
    spans = [r.get("accuracy_seed_interval") or r.get("accuracy_interval") for r in rows]
    errors = [[m - s[0] if s else 0 for m, s in zip(means, spans)], [s[1] - m if s else 0 for m, s in zip(means, spans)]]
    ax.errorbar(labels, means, yerr=errors, fmt="o", capsize=4, color="#264653", label="DPO")
    if base_score is not None:
        ax.axhline(base_score["accuracy"], color="#e76f51", linestyle="--", label="base")
        if base_score.get("interval"):
            ax.axhspan(*base_score["interval"], color="#e76f51", alpha=0.15)
    what = "seed spread 95%" if rows and rows[0]["seeds"] > 1 else "question bootstrap 95%"
    ax.set_ylim(0, 1)
    ax.set_title(f"absolute accuracy (verifier), {what}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)


def curves(rows: list[dict], path: Path) -> dict:
    """Every run's training curves (minidpo.curves) into `path`; -> the data drawn."""
    from minidpo.curves import plot_training_curves

    runs = {f"{r['label']} seed {run['seed']}": run["metrics"] for r in rows for run in r["runs"]}
    return plot_training_curves(runs, path)


# ---------------------------------------------------------------------------------------------------
# The sweep.

def make_judge(config: ExperimentConfig, preset: Preset):
    from minidpo import judge as harness

    if preset.name == "tiny":
        from minidpo.tinyworld import verifier_judge
        return verifier_judge(preset.world["world"])
    if config.judge == "local":
        return harness.local_judge(config.judge_model)
    return harness.openai_judge(config.judge_model, config.judge_base_url)


def base_score_row(sweep: Sweep, base: dict):
    score = score_stage(sweep, base)
    if score is None:
        return None
    score["interval"] = intervals.question_bootstrap(_stacked([score], "per_question", 2), intervals.accuracy,
                                                      samples=BOOTSTRAP_SAMPLES)
    return score


def run(config: ExperimentConfig, show_world: bool = True) -> list[dict]:
    """The whole sweep; writes results.json, results.md, plot.png and curves.png under `config.out`.
    `show_world`: print the world report's summary first (tiny preset)."""
    if config.dry_run:
        print(format_plan(sweep_plan(config)), flush=True)
        return []
    set_threads(config)
    preset = make_preset(config)
    if show_world and preset.world is not None and preset.world.get("report"):
        world_summary(Path(preset.world["report"]))
    sweep = Sweep(config, preset, *load_benchmark(preset), make_judge(config, preset), Path(config.cache))
    base = answers_stage(sweep, weights=preset.base_digest, model_id="base", seed=0)
    base_score = base_score_row(sweep, base)
    rows = []
    for row in plan_rows(config):
        runs = [run_one(sweep, row, seed, base) for seed in range(config.seeds)]
        rows.append(aggregate(row, runs, base_score))
    write_results(config, sweep, rows, base, base_score)
    return rows


def set_threads(config: ExperimentConfig) -> None:
    import torch

    if config.threads or config.preset == "tiny":
        torch.set_num_threads(config.threads or 1)


def world_summary(report: Path) -> None:
    """The world's report, in a few lines (its numbers are measured on the dev questions)."""
    from minidpo.tinybase import summary_lines

    lines = summary_lines(read_json(report))
    print("\n".join([f"tiny world ({report}):"] + lines), flush=True)


def write_results(config: ExperimentConfig, sweep: Sweep, rows: list[dict], base: dict, base_score) -> None:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, config.experiment, base_score, len(sweep.questions))
    world = sweep.preset.world or {}
    write_json(out / "results.json", {
        "experiment": config.experiment, "preset": config.preset, "split": config.split,
        "world_seed": config.world_seed if config.preset == "tiny" else None,
        "world_digest": world.get("digest"), "world_report": str(world["report"]) if world.get("report") else None,
        "questions_file": sweep.preset.questions, "questions": len(sweep.questions),
        "questions_digest": sweep.questions_digest, "references_digest": sweep.references_digest, "base": sweep.preset.base,
        "base_answers": {"digest": base["key"], "computed": base["computed"], "generation": base["generation"]},
        "base_score": base_score, "judge": getattr(sweep.judge, "judge_name", "callable"),
        "bootstrap": {"samples": BOOTSTRAP_SAMPLES, "unit": "question", "level": 0.95},
        "seed_spread": {"level": 0.95, "quantile": "t(0.975, seeds - 1)"}, "rows": rows})
    write_atomic(out / "results.md", table)
    plot(rows, config.experiment, out / "plot.png", base_score)
    write_json(out / "curves.json", curves(rows, out / "curves.png"))  # the data behind the figure
    print(f"\n{config.experiment} experiment ({config.preset}, {config.split}): {out}/results.md\n\n{table}",
          flush=True)


# ---------------------------------------------------------------------------------------------------
# The plan (--dry-run): what the sweep will train, answer and ask the judge, from the config alone.

def _plan_sizes(config: ExperimentConfig):
    """(set name -> (hub id or world file, rows)), questions per split, from where they are kept."""
    from minidpo.data import SHORT_NAMES
    from minidpo.tinyworld import PAPER_SIZES, split_sizes

    if config.preset == "paper":
        from minidpo.questions import MT_BENCH_SIZE
        return {n: (SHORT_NAMES[n], PAPER_SIZES[n]) for n in SETS}, MT_BENCH_SIZE
    world = world_config(config)
    sizes = split_sizes(world.total_pairs)
    count = getattr(world, "benchmark_questions" if config.split == "benchmark" else "dev_questions", None)
    return {n: (f"{config.world}/<world digest>/pairs/{n}.jsonl (sampled from the base)", sizes[n]) for n in SETS}, count


def sweep_plan(config: ExperimentConfig) -> dict:
    """Everything a user checks before paying for a run; nothing downloaded or written."""
    sets, questions = _plan_sizes(config)
    if config.preset == "paper":
        preset = paper_preset(config)
    else:
        from minidpo import tinybase
        preset = Preset("tiny", f"{config.world} (SFT base, built on first use)", "", {}, {}, config.split,
                        _choice(config.references, None), _choice(config.judge_prompts, None),
                        dict(tinybase.RECIPE), dict(tinybase.GENERATION))
    rows = [{"key": r["key"], "pairs": round(r["fraction"] * sum(sets[n][1] for n in r["names"]))}
            for r in plan_rows(config)]
    from minidpo.config import TrainConfig

    probe = TrainConfig(model=preset.base, data=["-"], out="-", **{**SWEEP_TRAIN, **preset.train, **config.train})
    recipe = {k: v for k, v in dataclasses.asdict(probe).items() if k not in ROW_FIELDS}
    requests = len(rows) * config.seeds * (questions or 0) * TURNS * ORDERS
    return {"experiment": config.experiment, "preset": config.preset, "split": config.split,
            "base": preset.base, "datasets": {n: {"source": s, "rows": k} for n, (s, k) in sets.items()},
            "rows": rows, "seeds": config.seeds, "trainings": len(rows) * config.seeds,
            "train": recipe, "generation": generation_settings(preset, config, 0),
            "questions": {"source": preset.questions, "count": questions, "turns": TURNS},
            "judge": ("tinyworld-verifier" if config.preset == "tiny" else
                      f"{config.judge}:{config.judge_model}" + (f" at {config.judge_base_url}"
                                                                 if config.judge == "openai" else "")),
            "judge_prompts": preset.judge_prompts or "builtin", "references": preset.references or "the questions' own",
            "judge_requests": requests, "out": config.out, "cache": config.cache}


def format_plan(plan: dict) -> str:
    from minidpo.judge_prompts import FASTCHAT_COMMIT

    pin = f" (FastChat {FASTCHAT_COMMIT[:12]}, SHA-256 checked)"
    lines = [f"{plan['experiment']} sweep, preset {plan['preset']}, split {plan['split']}: plan (nothing "
             f"downloaded or written)", f"base model: {plan['base']}", "datasets:"]
    lines += [f"  {n}: {d['source']}, {d['rows']:,} rows" for n, d in plan["datasets"].items()]
    lines += ["", "| run | pairs (at most) |", "|---|---:|"]
    lines += [f"| {r['key']} | {r['pairs']:,} |" for r in plan["rows"]]
    lines += ["", f"DPO trainings: {plan['trainings']} ({len(plan['rows'])} rows x {plan['seeds']} seed(s))",
              "DPO settings: " + ", ".join(f"{k}={v}" for k, v in sorted(plan["train"].items())
                                           if k not in BOOKKEEPING),
              "generation: " + ", ".join(f"{k}={v}" for k, v in sorted(plan["generation"].items()))
              + (" (seed: the row's DPO seed; the base's answers seed 0)" if "seed" in plan["generation"] else ""),
              f"questions: {plan['questions']['source']}, {plan['questions']['count']} x "
              f"{plan['questions']['turns']} turns",
              f"judge: {plan['judge']}",
              f"judge prompts: {plan['judge_prompts']}" + (pin if plan["judge_prompts"] == "fastchat" else ""),
              f"references: {plan['references']}" + (pin if plan["references"] == "fastchat" else ""),
              f"judge requests: {plan['judge_requests']:,} (rows x seeds x questions x {TURNS} turns x "
              f"{ORDERS} orders)", f"results: {plan['out']}; stages: {plan['cache']}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Command line: the sweep's own flags from ExperimentConfig, the training flags from TrainConfig.

DEMO = ("The offline demo (make demo): the paper's two DPO experiments on the tiny world. It builds the "
        "world (three synthetic preference sets shaped like the paper's, an SFT base with systematic "
        "mistakes, a benchmark in MT-Bench's shape, a verifier judge) and its report, then runs the "
        "volume sweep (nested fractions of the pooled sets) and the type sweep (each set alone): each row "
        "trains LoRA DPO, answers the benchmark, is judged pairwise against the base and scored alone. "
        "Results go to runs/volume and runs/type (results.md, results.json, plot.png, curves.png); every "
        "stage is keyed by its inputs under --cache, so a rerun recomputes only what a changed flag affects.")


def build_parser(experiment=None, command="demo") -> argparse.ArgumentParser:
    """Flags of `demo` (experiment None: both sweeps) or of one example script."""
    from minidpo.config import add_flags

    description = DEMO if experiment is None else (
        f"The paper's {experiment} experiment (arXiv 2410.16586); see minidpo.experiment.")
    p = argparse.ArgumentParser(prog=f"python -m minidpo {command}" if experiment is None else None,
                                description=description, allow_abbrev=False)
    sweep = p.add_argument_group("sweep")
    for f in dataclasses.fields(ExperimentConfig):
        if f.metadata.get("help") is None or (f.name == "experiment" and experiment is not None):
            continue
        default = f.default
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS,
                  "help": f.metadata["help"].replace("%", "%%") + f" (default: {default!r})"}
        if f.name == "experiment":
            kwargs["help"] = "run only this sweep (default: both, volume then type)"
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=type(default), choices=f.metadata.get("choices"))
        sweep.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    group = p.add_argument_group("training, as `python -m minidpo train` names them; applied over the "
                                 "preset's recipe (default: the recipe's value)")
    add_flags(group, skip=ROW_FIELDS + tuple(f.name for f in dataclasses.fields(ExperimentConfig)),
              dest_prefix="train.", show_defaults=False)
    return p


def config_from_args(parser, args: dict, experiment: str) -> ExperimentConfig:
    """ExperimentConfig from parsed flags; bad values exit with the parser's usage."""
    from minidpo.config import TrainConfig

    train = {k[len("train."):]: v for k, v in args.items() if k.startswith("train.")}
    own = {k: v for k, v in args.items() if not k.startswith("train.") and k != "experiment"}
    try:
        TrainConfig(model="-", data=["-"], out="-", **{**SWEEP_TRAIN, **train})  # range checks, now
        return ExperimentConfig(experiment=experiment, train=train, **own)
    except (ValueError, TypeError) as e:
        parser.error(str(e))


def parse(argv=None, experiment: str = "volume") -> ExperimentConfig:
    """An example script's command line -> ExperimentConfig."""
    parser = build_parser(experiment)
    return config_from_args(parser, vars(parser.parse_args(argv)), experiment)


def cli(argv=None, command: str = "demo") -> int:
    """`python -m minidpo demo`: both tiny experiments, offline, one after the other."""
    parser = build_parser(None, command)
    args = vars(parser.parse_args(argv))
    experiments = [args["experiment"]] if "experiment" in args else ["volume", "type"]
    start = time.time()
    for i, experiment in enumerate(experiments):
        given = dict(args)
        if "out" in given and len(experiments) > 1:
            given["out"] = str(Path(given["out"]) / experiment)
        run(config_from_args(parser, given, experiment), show_world=i == 0)
    log(f"demo finished in {(time.time() - start) / 60:.1f} min")
    return 0
