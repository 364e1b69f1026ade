"""The sweep driver: digest-keyed reruns, intervals, recorded settings, the paper plan, the flags.

The end-to-end tests run a miniature tiny-world sweep in process (a world of 100 pairs, a base
warm-started on 64 demonstrations, one DPO epoch), then rerun it with one knob changed at a time
and check from results.json which stages were computed again.
"""
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minidpo import experiment, intervals
from minidpo.experiment import aggregate, parse

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--world-pairs", "100", "--sft-size", "64", "--benchmark-questions", "16", "--epochs", "1",
         "--fractions", "0.5,1.0"]
# A world that builds in seconds: what it shows is not the point here, only what is recomputed.
FAST_WORLD = {"dev_questions": 16, "sft_epochs": 2, "samples": 2}


def sweep_args(root, *extra, out="volume"):
    return ["--world", str(root / "world"), "--cache", str(root / "cache"), "--out", str(root / out),
            *SMALL, *extra]


def run_sweep(argv, kind="volume"):
    """parse(argv) with FAST_WORLD, run, and return results.json."""
    config = dataclasses.replace(parse(argv, kind), world_overrides=FAST_WORLD)
    experiment.run(config)
    return json.loads((Path(config.out) / "results.json").read_text())


def results(root, out="volume"):
    return json.loads((root / out / "results.json").read_text())


def computed(res):
    """{row key: [stages computed]} and whether the base's answers were."""
    return {r["key"]: sorted(s for run in r["runs"] for s in run["computed"]) for r in res["rows"]}, \
        res["base_answers"]["computed"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("sweep")
    run_sweep(sweep_args(root))
    first = results(root)
    run_sweep(sweep_args(root))
    return root, first, results(root)


def test_results_files_are_consistent(sweep):
    root, res, _ = sweep
    out = root / "volume"
    questions = res["questions"]
    assert [r["fraction"] for r in res["rows"]] == [0.5, 1.0]
    for r in res["rows"]:
        assert r["wins"] + r["ties"] + r["losses"] + r["errors"] == 2 * questions  # 2 turns each
        assert r["question_turns"] == 2 * questions
        decided = r["wins"] + r["ties"] + r["losses"]
        assert r["win_rate"] == pytest.approx(r["wins"] / decided)
        assert r["net_win"] == pytest.approx((r["wins"] - r["losses"]) / decided)
        lo, hi = r["interval"]
        assert lo <= r["win_rate"] <= hi
        assert r["win_rate_seed_interval"] is None  # one seed: no spread to measure, and none shown
        assert 0 <= r["accuracy"] <= 1 and r["accuracy_interval"][0] <= r["accuracy"] <= r["accuracy_interval"][1]
        assert r["accuracy_gain"] == pytest.approx(r["accuracy"] - res["base_score"]["accuracy"])
        assert r["accuracy_gain_interval"][0] <= r["accuracy_gain"] <= r["accuracy_gain_interval"][1]
    table = (out / "results.md").read_text()
    assert "| base |" in table and "seed spread 95%" in table and "question bootstrap 95%" in table
    assert (out / "plot.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0


def test_curves_plot_holds_each_runs_metrics(sweep):
    root, res, _ = sweep
    drawn = json.loads((root / "volume" / "curves.json").read_text())
    assert sorted(drawn) == sorted(f"{r['label']} seed {run['seed']}" for r in res["rows"] for run in r["runs"])
    for r in res["rows"]:
        for run_ in r["runs"]:
            records = [json.loads(line) for line in Path(run_["metrics"]).read_text().splitlines() if line.strip()]
            records = [x for x in records if "rewards/margin" in x]
            assert records, "a DPO run logs its rewards"
            got = drawn[f"{r['label']} seed {run_['seed']}"]
            assert got["step"] == [x["step"] for x in records]
            for key in ("rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected"):
                assert got[key] == pytest.approx([x[key] for x in records])


def test_subsets_are_nested_and_counted(sweep):
    from minidpo.data import load_pairs, subset

    _, res, _ = sweep
    config = dataclasses.replace(parse(sweep_args(sweep[0]), "volume"), world_overrides=FAST_WORLD)
    sources = [experiment.make_preset(config).data[n] for n in experiment.SETS]
    pairs, _ = load_pairs(sources)
    half, _ = subset(pairs, 0.5, 0)
    full, _ = subset(pairs, 1.0, 0)
    assert set(map(id, half)) <= set(map(id, full))
    assert [r["pairs"] for r in res["rows"]] == [len(half), len(full)] == [50, 100]


def test_rerun_with_the_same_flags_recomputes_nothing(sweep):
    _, first, again = sweep
    assert computed(first) == ({"fraction-0.5": ["answers", "judge", "train"],
                                "fraction-1": ["answers", "judge", "train"]}, True)
    assert computed(again) == ({"fraction-0.5": [], "fraction-1": []}, False)
    strip = lambda res: [{k: v for k, v in r.items() if k != "runs"} for r in res["rows"]]  # noqa: E731
    assert strip(first) == strip(again)


def test_changed_epochs_retrain_every_row_and_nothing_upstream(sweep):
    root, first, _ = sweep
    run_sweep(sweep_args(root, "--epochs", "2", out="epochs"))
    res = results(root, "epochs")
    assert computed(res) == ({"fraction-0.5": ["answers", "judge", "train"],
                              "fraction-1": ["answers", "judge", "train"]}, False)  # base answers reused
    assert res["world_digest"] == first["world_digest"]
    for r, old in zip(res["rows"], first["rows"]):
        assert r["settings"]["epochs"] == 2 and old["settings"]["epochs"] == 1
        assert r["runs"][0]["digests"]["train"] != old["runs"][0]["digests"]["train"]


def test_a_new_fraction_computes_only_its_row(sweep):
    root, first, _ = sweep
    args = sweep_args(root, out="more")
    args[args.index("--fractions") + 1] = "0.5,1.0,0.75"
    run_sweep(args)
    res = results(root, "more")
    assert computed(res) == ({"fraction-0.5": [], "fraction-1": [], "fraction-0.75": ["answers", "judge", "train"]},
                             False)
    assert [r["runs"][0]["digests"] for r in res["rows"][:2]] == [r["runs"][0]["digests"] for r in first["rows"]]


def test_a_changed_world_recomputes_everything(sweep):
    root, first, _ = sweep
    args = sweep_args(root, out="world2")
    args[args.index("--world-pairs") + 1] = "120"
    run_sweep(args)
    res = results(root, "world2")
    assert res["world_digest"] != first["world_digest"]
    assert computed(res) == ({"fraction-0.5": ["answers", "judge", "train"],
                              "fraction-1": ["answers", "judge", "train"]}, True)
    assert [r["pairs"] for r in res["rows"]] == [60, 120]


def test_train_flags_are_recorded_per_run_and_key_the_training(sweep):
    root, first, _ = sweep
    args = sweep_args(root, "--beta", "0.3", "--lora-r", "4", out="beta")
    args[args.index("--fractions") + 1] = "1.0"
    run_sweep(args)
    res = results(root, "beta")
    settings = res["rows"][0]["runs"][0]["settings"]
    assert (settings["beta"], settings["lora_r"], settings["fraction"], settings["seed"]) == (0.3, 4, 1.0, 0)
    assert computed(res)[0] == {"fraction-1": ["answers", "judge", "train"]}
    assert res["rows"][0]["runs"][0]["digests"]["train"] != first["rows"][1]["runs"][0]["digests"]["train"]
    adapter = json.loads(next((root / "cache" / "train").glob(
        res["rows"][0]["runs"][0]["digests"]["train"][:16] + "/run/final/adapter_config.json")).read_text())
    assert adapter["r"] == 4  # the recorded setting is the one trained with


def test_dev_split_reuses_the_training_and_a_second_seed_trains_once(sweep):
    root, first, _ = sweep
    res = run_sweep(sweep_args(root, "--split", "dev", "--seeds", "2", out="dev"))
    assert res["split"] == "dev" and res["questions"] == FAST_WORLD["dev_questions"]
    assert res["questions_file"] != first["questions_file"] and res["world_digest"] == first["world_digest"]
    dev_ids = {json.loads(line)["question_id"] for line in open(res["questions_file"])}
    bench_ids = {json.loads(line)["turns"][0] for line in open(first["questions_file"])}
    assert not {json.loads(line)["turns"][0] for line in open(res["questions_file"])} & bench_ids
    assert len(dev_ids) == FAST_WORLD["dev_questions"]
    per_run = {(r["key"], run["seed"]): run["computed"] for r in res["rows"] for run in r["runs"]}
    assert per_run == {("fraction-0.5", 0): ["answers", "judge"], ("fraction-0.5", 1): ["train", "answers", "judge"],
                       ("fraction-1", 0): ["answers", "judge"], ("fraction-1", 1): ["train", "answers", "judge"]}
    assert res["base_answers"]["computed"]
    for r in res["rows"]:
        assert r["seeds"] == 2 and r["win_rate_seed_interval"] is not None
        assert r["wins"] + r["ties"] + r["losses"] + r["errors"] == 2 * 2 * FAST_WORLD["dev_questions"]


def test_judge_prompts_and_references_rejudge_and_nothing_else(sweep, tmp_path):
    from minidpo.judge_prompts import BUILTIN

    root, first, _ = sweep
    prompts = tmp_path / "prompts.jsonl"  # the built-in texts in FastChat's layout, one system prompt changed
    prompts.write_text("".join(json.dumps({"name": name, "type": "pairwise", "system_prompt": system + " Be fair.",
                                           "prompt_template": template}) + "\n"
                               for name, (system, template) in BUILTIN.prompts.items()))
    references = tmp_path / "refs.jsonl"
    questions = [json.loads(line) for line in open(first["questions_file"])]
    references.write_text("".join(json.dumps({"question_id": q["question_id"], "model_id": "gpt-4",
                                              "choices": [{"index": 0, "turns": ["r1", "r2"]}]}) + "\n"
                                  for q in questions))
    res = run_sweep(sweep_args(root, "--judge-prompts", str(prompts), "--references", str(references), out="prompts"))
    assert computed(res) == ({"fraction-0.5": ["judge"], "fraction-1": ["judge"]}, False)
    run0 = res["rows"][0]["runs"][0]
    assert run0["judge"]["prompts"]["name"] == "prompts.jsonl"
    assert "refs.jsonl" in run0["judge"]["references"]["files"]
    assert res["references_digest"] != first["references_digest"]
    assert res["questions_digest"] == first["questions_digest"]


# ---------------------------------------------------------------------------------------------------
# Intervals.

def test_t_quantile_matches_mpmath_and_the_tables():
    import mpmath  # pinned in requirements-test.txt (a sympy dependency)
    for df in (1, 2, 3, 5, 10, 40):
        for p in (0.9, 0.975, 0.995):
            # P(T <= x) = 1 - I_{df/(df+x^2)}(df/2, 1/2) / 2 for x > 0 (regularised incomplete beta)
            x = intervals.t_quantile(p, df)
            tail = mpmath.betainc(df / 2, 0.5, 0, df / (df + x * x), regularized=True) / 2
            assert float(1 - tail) == pytest.approx(p, abs=1e-9)
    assert intervals.t_quantile(0.975, 2) == pytest.approx(4.303, abs=5e-4)  # the (3 seeds)
    assert intervals.t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)  # Cauchy


def test_seed_spread_is_a_t_interval():
    rng = np.random.default_rng(7)
    values = list(rng.normal(0.3, 0.05, size=3))
    s = intervals.seed_spread(values)
    half = intervals.t_quantile(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
    assert s["interval"] == pytest.approx([np.mean(values) - half, np.mean(values) + half])
    assert s["t"] == pytest.approx(4.3027, abs=1e-4)
    assert intervals.seed_spread([0.4])["interval"] is None


def test_question_bootstrap_has_the_binomial_width():
    rng = np.random.default_rng(3)
    right = rng.random(400) < 0.6  # 400 one-turn questions, 60% right
    per_question = np.stack([right, np.ones(400)], axis=1)
    lo, hi = intervals.question_bootstrap(per_question, intervals.accuracy, samples=4000)
    p = right.mean()
    assert lo < p < hi
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / 400), rel=0.1)
    same = np.tile([[1, 0, 0, 0]], (10, 1))  # every question won: no spread at all
    assert intervals.question_bootstrap(same, intervals.win_rate) == [1.0, 1.0]


def test_aggregate_keeps_seed_spread_and_question_bootstrap_apart():
    def one(seed, outcomes):  # outcomes: per question, a (win, tie, loss, error) count over 2 turns
        w, t, l, e = (sum(o[i] for o in outcomes) for i in range(4))
        return {"seed": seed, "pairs": 50, "wins": w, "ties": t, "losses": l, "errors": e,
                "question_turns": w + t + l + e, "win_rate": w / (w + t + l), "adjusted_win_rate": 0.0,
                "net_win": (w - l) / (w + t + l), "settings": {"seed": seed},
                "per_question": {str(81 + i): list(o) for i, o in enumerate(outcomes)},
                "score": {"accuracy": 0.5 + seed / 10, "turn_1": 0.6, "turn_2": 0.4},
                "metrics": ""}

    rng = np.random.default_rng(0)
    runs = [one(s, [tuple(rng.multinomial(2, [0.3, 0.5, 0.2, 0.0])) for _ in range(20)]) for s in range(3)]
    row = aggregate({"key": "fraction-1", "label": "100%", "fraction": 1.0}, runs)
    rates = [r["win_rate"] for r in runs]
    half = 4.3027 * np.std(rates, ddof=1) / math.sqrt(3)
    assert row["win_rate"] == pytest.approx(np.mean(rates))
    assert row["win_rate_seed_interval"] == pytest.approx([np.mean(rates) - half, np.mean(rates) + half], abs=1e-4)
    w, t, l = (sum(r[k] for r in runs) for k in ("wins", "ties", "losses"))
    assert row["net_win"] == pytest.approx((w - l) / (w + t + l))  # pooled over seeds
    nets = [r["net_win"] for r in runs]
    nh = 4.3027 * np.std(nets, ddof=1) / math.sqrt(3)
    assert row["net_win_seed_interval"] == pytest.approx([np.mean(nets) - nh, np.mean(nets) + nh], abs=1e-4)
    assert row["interval"] != row["win_rate_seed_interval"]  # two quantities, two fields
    assert row["accuracy"] == pytest.approx(0.6) and row["accuracy_interval"] is None  # no per-question scores
    table = experiment.markdown([row], "volume", None, 20)
    assert row["seeds_ahead"] == sum(r["wins"] > r["losses"] for r in runs)
    assert f"| 100% | 50 | 3 | {row['seeds_ahead']} | {w} | {t} | {l} | 0 |" in table


def test_accuracy_gain_is_paired_over_questions():
    def scored(seed, right):  # right: per question, turns right out of 2
        return {"seed": seed, "score": {"accuracy": sum(right) / (2 * len(right)),
                                        "per_question": {str(81 + i): [k, 2] for i, k in enumerate(right)}}}

    rng = np.random.default_rng(1)
    base_right = list(rng.integers(0, 3, size=40))
    base = {"accuracy": sum(base_right) / 80, "per_question": {str(81 + i): [k, 2] for i, k in enumerate(base_right)}}
    same = experiment.accuracy_gain([scored(0, base_right), scored(1, base_right)], base)
    assert same["accuracy_gain"] == 0 and same["accuracy_gain_interval"] == [0.0, 0.0]  # paired: no spread
    better = [min(2, k + 1) if i % 2 else k for i, k in enumerate(base_right)]  # one more right on odd questions
    gain = experiment.accuracy_gain([scored(s, better) for s in range(3)], base)
    assert gain["accuracy_gain"] == pytest.approx((sum(better) - sum(base_right)) / 80)
    lo, hi = gain["accuracy_gain_interval"]
    assert 0 < lo <= gain["accuracy_gain"] <= hi  # every question moves up or stays: never below 0
    assert gain["accuracy_gain_seed_interval"] == pytest.approx([gain["accuracy_gain"]] * 2)  # seeds agree


# ---------------------------------------------------------------------------------------------------
# The plan and the flags.

def test_paper_dry_run_names_everything_and_writes_nothing(tmp_path):
    from minidpo.data import SHORT_NAMES
    from minidpo.tinyworld import PAPER_SIZES

    cmd = [sys.executable, str(ROOT / "examples" / "volume_experiment.py"), "--preset", "paper", "--dry-run",
           "--seeds", "2", "--beta", "0.2", "--judge-model", "gpt-4o"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=True).stdout
    assert not any(tmp_path.iterdir())
    assert experiment.PAPER_BASE in out
    for name in experiment.SETS:
        assert f"{SHORT_NAMES[name]}, {PAPER_SIZES[name]:,} rows" in out
    assert "beta=0.2" in out and "lora_r=16" in out and "loss=sigmoid" in out
    assert "max_new_tokens=1024" in out and "temperature=mt-bench" in out
    assert "judge: openai:gpt-4o" in out and "judge prompts: fastchat" in out and "references: fastchat" in out
    assert f"judge requests: {5 * 2 * 80 * 2 * 2:,}" in out and "DPO trainings: 10" in out
    plan = experiment.sweep_plan(parse(["--preset", "paper", "--greedy"], "type"))
    assert plan["generation"]["temperature"] == 0.0 and "seed" not in plan["generation"]
    assert plan["judge_requests"] == 3 * 80 * 2 * 2


def test_train_flags_come_from_trainconfig():
    from minidpo.train import TrainConfig

    parser = experiment.build_parser("volume")
    flags = {a.dest[len("train."):]: a for a in parser._actions if a.dest.startswith("train.")}
    expected = {f.name for f in dataclasses.fields(TrainConfig)} - set(experiment.ROW_FIELDS)
    assert set(flags) == expected
    for p in (parser, experiment.build_parser(None)):  # an example script's and demo's
        assert all(a.help for a in p._actions if a.dest != "help"), "every flag says what it does"
    config = parse(["--beta", "0.3", "--lora-r", "4", "--no-prefix-sharing", "--loss", "ipo",
                    "--lora-targets", "q_proj", "v_proj"], "volume")
    assert config.train == {"beta": 0.3, "lora_r": 4, "prefix_sharing": False, "loss": "ipo",
                            "lora_targets": ["q_proj", "v_proj"]}
    with pytest.raises(SystemExit):
        parse(["--loss", "no-such-loss"], "volume")
    with pytest.raises(SystemExit):
        parse(["--seed", "3"], "volume")  # the sweep sets each row's seed (--seeds K)


def test_demo_help_says_what_it_is(capsys):
    with pytest.raises(SystemExit):
        experiment.cli(["--help"])
    out = capsys.readouterr().out
    assert "tiny world" in out and "--world-seed" in out and "--seeds" in out and "--split" in out
    assert "--epochs" in out and "--benchmark-questions" in out


def test_default_out_names_split_and_world():
    assert parse([], "volume").out == "runs/volume"
    assert parse(["--split", "dev", "--world-seed", "2"], "type").out == "runs/type-dev-world-2"


def test_demo_runs_both_sweeps_with_the_same_flags(monkeypatch):
    seen = []
    monkeypatch.setattr(experiment, "run", lambda config, show_world=True: seen.append(config))
    assert experiment.cli(["--out", "somewhere", "--seeds", "3", "--world-seed", "2", "--beta", "0.2"]) == 0
    assert [(c.experiment, c.out, c.seeds, c.world_seed, c.train) for c in seen] == [
        ("volume", "somewhere/volume", 3, 2, {"beta": 0.2}), ("type", "somewhere/type", 3, 2, {"beta": 0.2})]
    seen.clear()
    experiment.cli(["--experiment", "type", "--split", "dev"])
    assert [(c.experiment, c.out) for c in seen] == [("type", "runs/type-dev")]
