"""A miniature volume sweep end to end through the example script (tiny world, few steps)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from minidpo.data import load_pairs, subset
from minidpo.experiment import DATASETS

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--world-pairs", "100", "--sft-size", "64", "--sft-epochs", "1", "--dpo-epochs", "1"]


def run_example(name, *args, cwd):
    cmd = [sys.executable, str(ROOT / "examples" / name), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, check=True)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    args = ["--world", str(root / "world"), "--out", str(root / "volume"), "--fractions", "0.5,1.0", *SMALL]
    first = run_example("volume_experiment.py", *args, cwd=root)
    again = run_example("volume_experiment.py", *args, cwd=root)
    return root, first, again


def test_results_files_are_consistent(sweep):
    root, first, _ = sweep
    out = root / "volume"
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["fraction"] for r in rows] == [0.5, 1.0]
    questions = sum(1 for _ in open(root / "world" / "benchmark" / "question.jsonl"))
    for r in rows:
        assert r["wins"] + r["ties"] + r["losses"] + r["errors"] == 2 * questions  # 2 turns each
        assert r["win_rate"] == pytest.approx(r["wins"] / (r["wins"] + r["ties"] + r["losses"]))
        lo, hi = r["interval"]
        assert lo <= r["win_rate"] <= hi
    assert (out / "results.md").read_text() in first.stdout
    assert (out / "plot.png").stat().st_size > 0


def test_subsets_are_nested_and_counted(sweep):
    root, _, _ = sweep
    rows = json.loads((root / "volume" / "results.json").read_text())["rows"]
    sources = [f"{root / 'world' / 'data' / name}.jsonl::{name}" for name in DATASETS]
    pairs, _ = load_pairs(sources)
    half, _ = subset(pairs, 0.5, 0)
    full, _ = subset(pairs, 1.0, 0)
    assert set(map(id, half)) <= set(map(id, full))
    assert [r["pairs"] for r in rows] == [len(half), len(full)] == [50, 100]


def test_rerun_skips_finished_runs(sweep):
    _, first, again = sweep
    assert "training" in first.stderr
    assert again.stderr.count("done before, skipped") == 2 and ": training" not in again.stderr
    assert first.stdout.split("volume experiment")[-1] == again.stdout.split("volume experiment")[-1]


def test_paper_dry_run_downloads_nothing(tmp_path):
    out = run_example("type_experiment.py", "--preset", "paper", "--dry-run", "--seeds", "2", cwd=tmp_path)
    assert "dataset-capybara" in out.stdout and "7,563" in out.stdout and "6 DPO trainings" in out.stdout
    assert not (tmp_path / "runs").exists()


def test_aggregate_over_seeds_reports_mean_and_spread():
    from minidpo.experiment import aggregate

    runs = [{"seed": s, "pairs": 50, "wins": w, "ties": 160 - w - l, "losses": l, "errors": 0,
             "win_rate": w / 160, "adjusted_win_rate": (w + (160 - w - l) / 2) / 160,
             "interval": {"win_rate": [0.0, 1.0]}} for s, (w, l) in enumerate([(10, 4), (20, 2), (6, 6)])]
    row = aggregate({"fraction": 0.5}, runs)
    rates = [10 / 160, 20 / 160, 6 / 160]
    mean = sum(rates) / 3
    sd = (sum((r - mean) ** 2 for r in rates) / 2) ** 0.5  # sample standard deviation
    assert (row["wins"], row["losses"], row["seeds"]) == (36, 12, 3)
    assert row["win_rate"] == pytest.approx(mean) and row["win_rate_std"] == pytest.approx(sd)
    assert row["interval"] == pytest.approx([mean - 1.96 * sd / 3 ** 0.5, mean + 1.96 * sd / 3 ** 0.5])
    assert aggregate({"dataset": "orca"}, runs[:1])["interval"] == [0.0, 1.0]
