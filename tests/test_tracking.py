"""`--report-to`: what each tracker holds, read back with the tool's own reader (TensorBoard's event
accumulator, W&B's `wandb leet inspect`, trackio's SQLite store), equals metrics.jsonl step for step
across a SIGKILL and `--resume`; the options are validated; training curves come from metrics.jsonl.
Nothing reaches the network: W&B runs offline with its telemetry off, trackio's store is a temp folder."""
import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import make_hf_mistral, write_tokenizer_folder
from minidpo.curves import CURVES, plot_training_curves
from minidpo import config as C
from minidpo.tracking import scalars

T = importlib.import_module("minidpo.train")
REPO = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
TOOLS = [name for name in ("tensorboard", "wandb", "trackio") if importlib.util.find_spec(name)]

KEY = "minidpo-test-key-0123456789abcdef0123456789abcdef"  # a stand-in W&B key: never printed
pytestmark = pytest.mark.usefixtures("one_thread")

# `python -m minidpo train ARGS`, SIGKILLed as optimizer step KILL_AT begins when that is set, after a
# second in which the trackers' background writers (trackio's: every 0.5 s) store what they were given.
CHILD = textwrap.dedent("""
    import importlib, os, sys, time
    T = importlib.import_module("minidpo.train")
    kill_at, real, calls = int(os.environ.get("KILL_AT", "0")), T.dpo_step, [0]
    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            time.sleep(1.0)
            os.kill(os.getpid(), 9)
        return real(*args, **kwargs)
    T.dpo_step = step
    sys.exit(T.cli(sys.argv[1:], command="train"))
""")


def require(tool: str) -> None:
    if tool not in TOOLS:
        pytest.skip(f"{tool} is not installed (pip install {tool}, or pip install -r requirements-test.txt)")


def child_env(root: Path) -> dict:
    """Offline and quiet: W&B without uploads, telemetry, console capture or system stats; trackio's
    store, W&B's and the hub's caches in the test's folder; no key or remote target inherited."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "TRACKIO_")) and k not in ("HF_TOKEN", "HF_HOME")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(root / "hf"), "TRACKIO_DIR": str(root / "trackio"),
            "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
            "WANDB_ERROR_REPORTING": "false", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
            "WANDB_X_DISABLE_STATS": "true", "WANDB_X_DISABLE_META": "true",
            "WANDB_CONFIG_DIR": str(root / "wandb-config"), "WANDB_CACHE_DIR": str(root / "wandb-cache"),
            "WANDB_DATA_DIR": str(root / "wandb-data")}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A 5-step run with every installed tracker and evals at steps 2, 4, 5, SIGKILLed as step 4
    begins (step 3 is logged everywhere, the checkpoint is step 2), then resumed to the end."""
    root = tmp_path_factory.mktemp("tracking")
    make_hf_mistral(root / "model", **TINY)
    write_tokenizer_folder(root / "model")
    rows = [{"prompt": f"What is {i} plus 30?", "chosen": f"The answer is {i + 30}.",
             "rejected": "pear, apple, fig, banana."} for i in range(10)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = T.TrainConfig(model=str(root / "model"), data=[str(root / "pairs.jsonl")], out=str(root / "out"),
                           max_length=48, batch_size=4, lr=1e-2, warmup_ratio=0.0, max_steps=5, lora_r=4,
                           lora_alpha=8.0, lora_dropout=0.0, eval_fraction=0.2, eval_every=2, save_every=2,
                           report_to=TOOLS or ["none"])
    env = {**child_env(root), "WANDB_API_KEY": KEY}
    for kill_at, argv in ((4, C.config_argv(config)), (0, C.config_argv(dataclasses.replace(config, resume=True)))):
        result = subprocess.run([sys.executable, "-c", CHILD, *argv], env={**env, "KILL_AT": str(kill_at)},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == (-9 if kill_at else 0), result.stderr[-3000:]
        assert KEY not in result.stdout + result.stderr
        if kill_at:
            assert [r["step"] for r in records(config.out) if "loss" in r] == [1, 2, 3]
    return config, Path(config.out), env


def records(out) -> list:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_the_resumed_run_is_complete(tracked):
    config, out, _ = tracked
    steps = [(r["step"], "loss" in r) for r in records(out)]
    assert steps == [(1, True), (2, True), (2, False), (3, True), (4, True), (4, False), (5, True), (5, False)]


# ---------------------------------------------------------------------------------------------------
# Each tool's own reader.

def test_tensorboard_scalars_equal_metrics_jsonl(tracked):
    require("tensorboard")
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea  # the server's reader
    from tensorboard.util import tensor_util

    _, out, _ = tracked

    def read(path):
        acc = pea.EventAccumulator(str(path), size_guidance={pea.TENSORS: 0})
        acc.Reload()
        return acc, {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors(tag)]
                     for tag in acc.Tags()["tensors"] if tag != "config/text_summary"}

    acc, seen = read(out / "tensorboard")
    expected = {}
    for record in records(out):
        for key, value in scalars(record).items():
            expected.setdefault(key, []).append((record["step"], float(value)))
    assert seen == expected
    assert len(acc.Tensors("config/text_summary")) == 1  # the config, once
    killed = sorted((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(killed) == 2  # one file per process; the killed one's step 3 is superseded, not lost
    assert [step for step, _ in read(killed[0])[1]["loss"]] == [1, 2, 3]


def test_wandb_offline_history_equals_metrics_jsonl(tracked):
    require("wandb")
    _, out, env = tracked
    run_id = json.loads((out / "tracker_run.json").read_text())["id"]
    folders = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 2  # the killed process's part of the run and the resumed one, one run id
    history, runs = [], []
    for folder in folders:  # W&B's own reader of a run's transaction log
        text = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(folder)],
                              env=env, capture_output=True, text=True, check=True, timeout=120).stdout
        entries = [json.loads(line) for line in text.splitlines()]
        runs += [e["run"] for e in entries if e["type"] == "run"]
        history += [e["history"]["item"] for e in entries if e["type"] == "history"]
    # wandb-core buffers its log: the killed process may have left anything from nothing to step 3.
    assert {r["run_id"] for r in runs} == {run_id} and runs[-1]["resume"]
    assert {k: v for k, v in runs[-1]["config"]["update"].items() if k != "_wandb"} == \
        json.loads(json.dumps(dataclasses.asdict(dataclasses.replace(tracked[0], resume=True))))
    expected = {}
    for record in records(out):  # W&B keeps one row per step: a step's training and eval records
        expected.setdefault(record["step"], {}).update(scalars(record))
    assert [row["_step"] for row in history] == list(expected)
    for row in history:
        assert {k: v for k, v in row.items() if not k.startswith("_")} == expected[row["_step"]]


def test_trackio_store_equals_metrics_jsonl(tracked):
    require("trackio")
    _, out, env = tracked
    name = json.loads((out / "tracker_run.json").read_text())["name"]
    read = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; n = sys.argv[1]; "
            "print(json.dumps([S.get_logs('minidpo', n), S.get_run_config('minidpo', n), "
            "[r['name'] for r in S.get_run_records('minidpo')]]))")
    text = subprocess.run([sys.executable, "-c", read, name], env=env, capture_output=True, text=True,
                          check=True, timeout=120).stdout
    logs, run_config, names = json.loads(text.splitlines()[-1])
    assert names == [name]  # one run: the killed process's rows were replaced, not left beside it
    seen = [{k: v for k, v in row.items() if k != "timestamp"} for row in logs]
    expected = [{**scalars(r), "step": r["step"]} for r in records(out)]
    assert sorted(seen, key=lambda r: r["step"]) == expected
    assert run_config["max_steps"] == 5 and run_config["report_to"] == TOOLS


# ---------------------------------------------------------------------------------------------------
# Options.

def test_report_to_is_validated_before_anything_loads(tmp_path, monkeypatch):
    base = dict(model="m", data=["d"], out=str(tmp_path / "out"))
    assert T.TrainConfig(**base).report_to == ["none"]
    with pytest.raises(ValueError, match="choose from"):
        T.TrainConfig(**base, report_to=["comet"])
    with pytest.raises(ValueError, match="cannot be combined"):
        T.TrainConfig(**base, report_to=["none", "wandb"])
    imported = []

    def fake_import(name, *args):  # wandb missing, the others "installed"
        if name == "wandb":
            raise ModuleNotFoundError("No module named 'wandb'")
        imported.append(name)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(ValueError, match=r"--report-to wandb needs the `wandb` package: pip install wandb"):
        T.TrainConfig(**base, report_to=["tensorboard,wandb"])
    assert imported == ["torch.utils.tensorboard"]  # the module the writer needs, not just a name
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: None)  # every tool "installed"
    config = T.parse_config(["--model", "m", "--data", "d", "--out", "o", "--report-to", "tensorboard", "wandb,trackio"])
    assert config.report_to == ["tensorboard", "wandb", "trackio"]
    assert C.parse_config(C.config_argv(config)).report_to == config.report_to
    assert "report_to" in C.RESUMABLE_CHANGES  # a resumed run may add or drop a tracker


# ---------------------------------------------------------------------------------------------------
# Training curves.

def test_training_curves_plot_holds_each_rows_numbers(tracked, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    _, out, _ = tracked
    other = tmp_path / "other.jsonl"  # a second row: a different run's numbers, an eval record, a blank line
    rows = [{"step": s, "loss": 0.7 - 0.1 * s, "rewards/margin": 0.3 * s, "rewards/accuracy": s / 4,
             "logps/chosen": -20.0 + s, "logps/rejected": -25.0 - 2 * s} for s in (1, 2, 3)]
    rows.insert(2, {"step": 2, "eval/loss": 0.5, "eval/rewards/margin": 9.0})
    other.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    runs = {"resumed tiny run": out / "metrics.jsonl", "second row": other}
    figures = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), savefig(fig, *a, **k))[1])

    data = plot_training_curves(runs, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0 and len(figures) == 1
    expected = {}
    for label, file in runs.items():
        train = [json.loads(line) for line in Path(file).read_text().splitlines() if '"loss"' in line]
        expected[label] = {key: [r[key] for r in train] for key in ("step", *CURVES)}
    assert expected["resumed tiny run"]["step"] == [1, 2, 3, 4, 5] and expected["second row"]["step"] == [1, 2, 3]
    assert data == expected
    panels = figures[0].axes
    assert [ax.get_title() for ax in panels] == list(CURVES.values())
    for ax, key in zip(panels, CURVES):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert lines.keys() == runs.keys()
        for label, line in lines.items():
            assert list(line.get_xdata()) == expected[label]["step"]
            assert list(line.get_ydata()) == expected[label][key]


def test_training_curves_name_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="row 'a'.*missing.jsonl"):
        plot_training_curves({"a": tmp_path / "missing.jsonl"}, tmp_path / "x.png")
