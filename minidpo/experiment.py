"""The paper's two experiments (arXiv 2410.16586): DPO on more or less data, and on each data type.

Each row of a sweep trains a LoRA DPO run from the base model, answers the benchmark with it, and
judges it pairwise against the base (both orders, ties, win rate with a bootstrap interval):

    volume   pool the three preference sets, train on nested 20/40/60/80/100% subsets
    type     train on each set alone (A conversational, B and C question answering)

Two presets run through exactly the same code: `tiny` (default) is the offline tiny world of
`minidpo.tinyworld` with its verifier judge; `paper` is OpenHermes-2.5-Mistral-7B, the three hub
datasets, MT-Bench's 80 questions and an OpenAI-compatible judge. Every stage writes files, a
finished row is skipped on rerun, and a crash loses at most the row in progress.
"""
import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DATASETS = {  # the paper's three sets: short name -> hub id
    "capybara": "argilla/distilabel-capybara-dpo-7k-binarized",
    "orca": "Intel/orca_dpo_pairs",
    "ultrafeedback": "argilla/ultrafeedback-binarized-preferences",
}
PAPER_ROWS = {"capybara": 7563, "orca": 12859, "ultrafeedback": 63619}  # rows on the hub cards
SFT_EPOCHS, SFT_LR = 10, 3e-3  # the tiny base's warm start: long enough to be a usable, imperfect model


def _world_config(config: "ExperimentConfig"):
    from minidpo.tinyworld import WorldConfig
    # ~1M parameters: the 0.2M default cannot learn to copy words from the prompt in minutes.
    return WorldConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       total_pairs=config.world_pairs, sft_size=config.sft_size)


@dataclass
class Preset:
    """What a sweep trains, on what, and how it is judged. The paper states no hyperparameters:
    the `paper` values are our choices, written in the README."""

    base: str  # model folder or hub id of the base (the SFT model DPO starts from)
    data: dict  # short name -> source for minidpo.data
    questions: str  # question file, or "mt-bench"
    beta: float = 0.1
    lora_r: int = 16
    lora_alpha: float = 16.0
    lr: float = 5e-5
    schedule: str = "cosine"
    warmup_ratio: float = 0.1
    epochs: int = 1
    batch_size: int = 16
    max_length: int = 1024
    max_prompt_length: int = 512
    template: str = "chatml"
    max_new_tokens: int = 1024
    extra: dict = field(default_factory=dict)  # any other TrainConfig fields


def paper_preset() -> Preset:
    return Preset(base="teknium/OpenHermes-2.5-Mistral-7B", data=dict(DATASETS), questions="mt-bench")


def tiny_preset(config: "ExperimentConfig") -> Preset:
    """The tiny world, built (and its base model warm-started by SFT) on first use."""
    world = Path(config.world)
    paths = tiny_world(config)
    data = {name: f"{paths[name]}::{name}" for name in DATASETS}
    return Preset(base=str(world / "base"), data=data, questions=str(paths["questions"]),
                  beta=0.1, lora_r=16, lora_alpha=32.0, lr=2e-3, warmup_ratio=0.1, epochs=2,
                  batch_size=16, max_length=128, max_prompt_length=96, max_new_tokens=24,
                  extra={"lora_dropout": 0.0, "rpo_alpha": 1.0})


def tiny_world(config: "ExperimentConfig") -> dict:
    """Write the tiny world once, then SFT a randomly initialised tiny Mistral into its base."""
    from minidpo import tinyworld

    world = Path(config.world)
    if not (world / "world.json").is_file():
        log(f"writing the tiny world to {world}")
        tinyworld.write_world(world, _world_config(config))
    paths = {name: world / rel for name, rel in tinyworld.FILES.items()}
    if not (world / "base" / "config.json").is_file():
        warm_start(world, paths, config.sft_epochs)
    return paths


def warm_start(world: Path, paths: dict, epochs: int) -> None:
    """Random tiny Mistral -> SFT on the world's imperfect demonstrations -> `world/base`."""
    import shutil

    import minidpo
    from minidpo.train import TrainConfig, train

    init = world / "init"
    config = minidpo.MistralConfig.from_json(paths["model"] / "config.json")
    minidpo.save_model(minidpo.Mistral(config).init_weights(seed=0), init)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(paths["model"] / name, init / name)
    log("SFT warm start of the base model on the world's demonstrations")
    train(TrainConfig(model=str(init), data=[f"{paths['sft']}::sft"], out=str(world / "sft"), mode="sft",
                      full=True, lr=SFT_LR, epochs=epochs, batch_size=32, max_length=128, max_prompt_length=96,
                      warmup_ratio=0.05, seed=0, save_every=100, resume=True, template="chatml"))
    shutil.copytree(world / "sft" / "final", world / "base.tmp", dirs_exist_ok=True)
    os.replace(world / "base.tmp", world / "base")


@dataclass
class ExperimentConfig:
    """One sweep. Fields become `--flags` of the example scripts."""

    experiment: str = "volume"  # volume (nested fractions of the pooled sets) or type (each set alone)
    preset: str = "tiny"  # tiny (offline, minutes on a CPU) or paper (OpenHermes-2.5, hub data, MT-Bench)
    out: str = ""  # output folder ("": runs/<experiment>)
    world: str = "runs/tinyworld"  # where the tiny preset keeps its world and base model
    seeds: int = 1  # repeat each row with this many seeds (mean and spread of the win rate)
    dry_run: bool = False  # print the plan (runs, pairs, tokens) and stop; downloads nothing
    judge: str = "openai"  # paper preset: openai (an OpenAI-compatible endpoint) or local
    judge_model: str = "gpt-4"  # judge model name (openai) or folder (local)
    judge_base_url: str = "https://api.openai.com/v1"  # OpenAI-compatible base URL
    workers: int = 4  # concurrent judge requests
    fractions: str = "0.2,0.4,0.6,0.8,1.0"  # volume experiment: the nested fractions, comma-separated
    world_pairs: int = 1500  # tiny preset: preference pairs in the world (A + B + C)
    sft_size: int = 4000  # tiny preset: SFT demonstrations of the base's warm start
    sft_epochs: int = SFT_EPOCHS  # tiny preset: passes of the warm start over them
    dpo_epochs: int = 0  # passes of each DPO run over its pairs (0: the preset's)

    def __post_init__(self):
        if self.experiment not in ("volume", "type"):
            raise ValueError(f"experiment must be 'volume' or 'type', got {self.experiment!r}")
        if self.preset not in ("tiny", "paper"):
            raise ValueError(f"preset must be 'tiny' or 'paper', got {self.preset!r}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        self.out = self.out or f"runs/{self.experiment}"
        try:
            self.fraction_values = tuple(float(f) for f in self.fractions.split(","))
        except ValueError as e:
            raise ValueError(f"--fractions must be comma-separated numbers, got {self.fractions!r}") from e
        if not all(0 < f <= 1 for f in self.fraction_values):
            raise ValueError(f"--fractions must lie in (0, 1], got {self.fractions!r}")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def plan(config: ExperimentConfig) -> list[dict]:
    """The sweep's rows: [{"key", "fraction" or "dataset", "sources", "fraction_value"}]."""
    names = list(DATASETS)
    if config.experiment == "volume":
        return [{"key": f"fraction-{f:g}", "fraction": f, "names": names} for f in config.fraction_values]
    return [{"key": f"dataset-{n}", "dataset": n, "names": [n]} for n in names]


def dry_run(config: ExperimentConfig, preset_max_length: int = 1024) -> None:
    """Runs, pairs and an upper bound on tokens, from the hub cards' row counts (nothing downloaded)."""
    print(f"{config.experiment} sweep, preset {config.preset}, {config.seeds} seed(s), out {config.out}")
    print("| run | pairs | tokens (at most, chosen + rejected) |\n|---|---|---|")
    for row in plan(config):
        pairs = round(row.get("fraction", 1.0) * sum(PAPER_ROWS[n] for n in row["names"]))
        print(f"| {row['key']} | {pairs:,} | {pairs * 2 * preset_max_length:,} |")
    print(f"runs: {len(plan(config)) * config.seeds} DPO trainings, each answered and judged on the benchmark")


def train_row(config: ExperimentConfig, preset: Preset, row: dict, seed: int, run_dir: Path):
    """LoRA DPO for one row and seed -> (adapter folder, pairs trained on). Resumes an interrupted run."""
    from minidpo.train import TrainConfig, train

    final, count = run_dir / "train" / "final", run_dir / "train_pairs.json"
    if (final / "adapter_config.json").is_file() and count.is_file():
        return final, json.loads(count.read_text())
    result = train(TrainConfig(
        model=preset.base, data=[preset.data[n] for n in row["names"]], out=str(run_dir / "train"),
        fraction=row.get("fraction", 1.0), seed=seed, beta=preset.beta, lora_r=preset.lora_r,
        lora_alpha=preset.lora_alpha, lr=preset.lr, schedule=preset.schedule,
        warmup_ratio=preset.warmup_ratio, epochs=preset.epochs, batch_size=preset.batch_size,
        max_length=preset.max_length, max_prompt_length=preset.max_prompt_length,
        template=preset.template, reference="precomputed", ref_cache_dir=str(Path(config.out) / "reference"),
        save_every=50, resume=True, **preset.extra))
    count.write_text(json.dumps(result["train_pairs"]))
    return final, result["train_pairs"]


def answers(preset: Preset, out_path: Path, model_id: str, lora=None) -> Path:
    """Answer the benchmark with the base (or base + adapter); resumes a partial answers file."""
    from minidpo.generate import answer_questions, load_for_generation

    model, tok = load_for_generation(preset.base, lora=lora, template=preset.template)
    answer_questions(model, tok, preset.questions, model_id=model_id, out_path=out_path,
                     max_new_tokens=preset.max_new_tokens, batch_size=16, progress=True)
    return out_path


def make_judge(config: ExperimentConfig, preset: Preset):
    from minidpo import judge as harness

    if config.preset == "tiny":
        from minidpo.tinyworld import verifier_judge
        return verifier_judge(Path(config.world))
    if config.judge == "local":
        return harness.local_judge(config.judge_model)
    return harness.openai_judge(config.judge_model, config.judge_base_url)


def run_row(config, preset, judge, row, seed, base_answers) -> dict:
    """Train, answer, judge one (row, seed); `result.json` marks it done."""
    run_dir = Path(config.out) / f"{row['key']}-seed-{seed}"
    done = run_dir / "result.json"
    if done.is_file():
        log(f"{run_dir.name}: done before, skipped")
        return json.loads(done.read_text())
    log(f"{run_dir.name}: training")
    adapter, pairs = train_row(config, preset, row, seed, run_dir)
    log(f"{run_dir.name}: answering the benchmark")
    mine = answers(preset, run_dir / "answers.jsonl", f"dpo-{run_dir.name}", lora=adapter)
    log(f"{run_dir.name}: judging against the base")
    from minidpo.judge import judge_pairwise
    summary = judge_pairwise(preset.questions, mine, base_answers, judge, run_dir / "judge",
                             workers=config.workers if config.preset == "paper" else 1)
    result = {"seed": seed, "pairs": pairs, **{k: summary[k] for k in
              ("wins", "ties", "losses", "errors", "win_rate", "adjusted_win_rate", "interval")}}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, done)
    return result


def aggregate(row: dict, results: list[dict]) -> dict:
    """One table row from a row's seeds: summed counts, mean win rate, its spread and interval."""
    label = {"fraction": row["fraction"]} if "fraction" in row else {"dataset": row["dataset"]}
    rates = [r["win_rate"] for r in results]
    out = {**label, "pairs": results[0]["pairs"], "seeds": len(results)}
    for k in ("wins", "ties", "losses", "errors"):
        out[k] = sum(r[k] for r in results)
    out["win_rate"] = statistics.fmean(rates)
    out["adjusted_win_rate"] = statistics.fmean(r["adjusted_win_rate"] for r in results)
    if len(results) == 1:
        out["interval"] = results[0]["interval"]["win_rate"]
    else:  # spread over seeds: the paper's stability claim, measured
        sd = statistics.stdev(rates)
        out["win_rate_std"] = sd
        half = 1.96 * sd / math.sqrt(len(rates))
        out["interval"] = [out["win_rate"] - half, out["win_rate"] + half]
    out["runs"] = results
    return out


def markdown(rows: list[dict], experiment: str) -> str:
    key = "fraction" if experiment == "volume" else "dataset"
    lines = [f"| {key} | pairs | wins | ties | losses | errors | win rate | 95% interval |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = f"{r[key]:.0%}" if key == "fraction" else r[key]
        spread = f" ± {r['win_rate_std']:.3f}" if "win_rate_std" in r else ""
        lo, hi = r["interval"]
        lines.append(f"| {label} | {r['pairs']} | {r['wins']} | {r['ties']} | {r['losses']} | {r['errors']} "
                     f"| {r['win_rate']:.3f}{spread} | [{lo:.3f}, {hi:.3f}] |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], experiment: str, path: Path) -> None:
    """Stacked wins/ties/losses per row (matplotlib, the `plot` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed (pip install 'minidpo[plot]'): {path} not drawn")
        return
    key = "fraction" if experiment == "volume" else "dataset"
    labels = [f"{r[key]:.0%}" if key == "fraction" else r[key] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = [0] * len(rows)
    for name, colour in (("wins", "#2a9d8f"), ("ties", "#bbbbbb"), ("losses", "#e76f51")):
        values = [r[name] for r in rows]
        ax.bar(labels, values, bottom=bottom, color=colour, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("question-turns")
    ax.set_title(f"DPO vs base: {experiment} experiment")
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: ExperimentConfig) -> list[dict]:
    """The whole sweep; writes results.json, results.md and plot.png under `config.out`."""
    if config.dry_run:
        preset = paper_preset() if config.preset == "paper" else None
        dry_run(config, preset.max_length if preset else 128)
        return []
    preset = tiny_preset(config) if config.preset == "tiny" else paper_preset()
    if config.dpo_epochs:
        preset.epochs = config.dpo_epochs
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    judge = make_judge(config, preset)
    log("answering the benchmark with the base model")
    base_answers = answers(preset, out / "base_answers.jsonl", "base")
    rows = []
    for row in plan(config):
        results = [run_row(config, preset, judge, row, seed, base_answers) for seed in range(config.seeds)]
        rows.append(aggregate(row, results))
    table = markdown(rows, config.experiment)
    (out / "results.json").write_text(json.dumps({"experiment": config.experiment, "preset": config.preset,
                                                  "rows": rows}, indent=2) + "\n")
    (out / "results.md").write_text(table)
    plot(rows, config.experiment, out / "plot.png")
    print(f"\n{config.experiment} experiment ({config.preset}): {out}/results.md\n\n{table}", flush=True)
    return rows


def parse(argv=None, experiment: str = "volume") -> ExperimentConfig:
    p = argparse.ArgumentParser(description=f"The paper's {experiment} experiment (see minidpo.experiment).")
    defaults = ExperimentConfig(experiment=experiment)
    for f in dataclasses.fields(ExperimentConfig):
        if f.name == "experiment":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true")
        else:
            p.add_argument(flag, type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name))
    return ExperimentConfig(experiment=experiment, **vars(p.parse_args(argv)))


def cli(argv=None, command: str = "demo") -> int:
    """`python -m minidpo demo`: both tiny experiments, offline, one after the other."""
    start = time.time()
    for experiment in ("volume", "type"):
        run(parse(argv, experiment))
    log(f"demo finished in {(time.time() - start) / 60:.1f} min")
    return 0
