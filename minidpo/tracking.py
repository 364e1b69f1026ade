"""Training runs users can watch: TensorBoard, Weights & Biases and trackio (`--report-to`).

    check_report_to(names) -> list     the names validated, each tool's package imported
    open_trackers(config, out, step)   -> Trackers: rank 0's trackers, opened at the resume point
    Trackers.log(record)               one metrics.jsonl record to every tracker (a context: closes)

`metrics.jsonl` stays the source of truth: every record goes to each tracker with the same keys
(`loss`, `rewards/margin`, `eval/loss`...) and its `step` as the x-axis, and the run's config is logged
once. A resumed run continues the same tracker run and each step is seen once, with metrics.jsonl's
values: what a killed process logged past the checkpoint is dropped (as metrics.jsonl drops it), and
what a tracker lacks up to the checkpoint is replayed from metrics.jsonl.

    tensorboard  OUT/tensorboard/ (torch's SummaryWriter, float64 scalars, flushed every record); each
                 process opens a session at its first step (`purge_step`): TensorBoard's reader then
                 drops the older events from that step on
    wandb        OUT/wandb/, offline unless WANDB_MODE says otherwise (upload later with
                 `wandb sync OUT/wandb/offline-run-*`); the run id is kept in OUT/tracker_run.json and a
                 resumed run continues it (resume="allow") from the first step W&B lacks: W&B's history
                 is append-only, so steps past the checkpoint that it already holds stay as logged
    trackio      trackio's local store (TRACKIO_DIR, by default ~/.cache/huggingface/trackio), project
                 `minidpo`; a resumed run is rewritten from metrics.jsonl, then continues
"""
import dataclasses
import importlib
import json
import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

from minidpo.files import write_json

logger = logging.getLogger(__name__)

REPORT_TO = ("none", "tensorboard", "wandb", "trackio")
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "trackio": "trackio"}  # what each imports
PROJECT = "minidpo"  # W&B (unless WANDB_PROJECT is set) and trackio project


def check_report_to(names) -> list[str]:
    """-> the `--report-to` names (commas split, repeats dropped); ValueError names an unknown tool, or
    the package to install for one that does not import. `none` alone means no tracker."""
    names = [n for item in ([names] if isinstance(names, str) else names) for n in str(item).split(",") if n]
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown or not names:
        raise ValueError(f"TrainConfig.report_to={names!r}; choose from {list(REPORT_TO)} (several allowed)")
    if "none" in names and len(names) > 1:
        raise ValueError(f"TrainConfig.report_to={names!r}: 'none' cannot be combined with a tracker")
    for name in (n for n in names if n != "none"):
        try:
            importlib.import_module(MODULES[name])
        except ImportError as e:
            raise ValueError(f"--report-to {name} needs the `{name}` package: pip install {name} "
                             f"(or pip install 'minidpo[{name}]'); importing {MODULES[name]} failed: {e}") from e
    return list(dict.fromkeys(names))


def scalars(record: dict) -> dict:
    """The record's numbers but `step` (the x-axis)."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def run_identity(out: Path) -> dict:
    """OUT/tracker_run.json: the tracker run's `id` and `name`, made once per output folder."""
    file = out / "tracker_run.json"
    if file.is_file():
        return json.loads(file.read_text())
    run_id = secrets.token_hex(4)
    identity = {"id": run_id, "name": f"{out.resolve().name}-{run_id}"}
    write_json(file, identity, indent=None)
    return identity


# ---------------------------------------------------------------------------------------------------
# One class per tool: opened with the run's config at `step` (0, or the checkpoint resumed from);
# `held` is the last step the tool already holds (Trackers replays the records after it).

class TensorBoard:
    def __init__(self, config, out: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        folder = out / "tensorboard"
        self.held = step if any(folder.glob("events.out.tfevents.*")) else 0
        # A session starts at step + 1: TensorBoard drops older events at or after it (a killed run's).
        self.writer = SummaryWriter(str(folder), purge_step=self.held + 1)
        logger.info("tensorboard: writing %s (view it: tensorboard --logdir %s)", folder, folder)
        if self.held == 0:
            self.writer.add_text("config", "```\n" + json.dumps(dataclasses.asdict(config), indent=2) + "\n```", 0)

    def log(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["step"], new_style=True, double_precision=True)
        self.writer.flush()  # a checkpoint never runs ahead of the events on disk

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandB:
    def __init__(self, config, out: Path, step: int):
        # Offline unless the user chose a mode: nothing is uploaded that was not asked for, not even
        # W&B's error reports (read when wandb-core starts).
        mode = os.environ.get("WANDB_MODE") or "offline"
        if mode in ("offline", "dryrun", "disabled"):
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb

        identity = run_identity(out)
        earlier = sorted((out / "wandb").glob(f"*run-*-{identity['id']}"))
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=identity["name"],
                              id=identity["id"], resume="allow", dir=str(out), mode=mode,
                              config=dataclasses.asdict(config), reinit="create_new")
        if mode == "online":
            self.held = max(self.run.step - 1, 0) if self.run.resumed else 0  # the server's count
        else:  # offline W&B knows nothing of the earlier folders: read what they hold
            self.held = max((row["step"] for f in earlier for row in wandb_history(f)), default=0)
        if self.held > step:
            logger.warning("wandb: run %s already holds steps %d-%d from the interrupted process; W&B's "
                           "history is append-only, so they stay as logged", identity["id"], step + 1, self.held)

    def log(self, record: dict) -> None:
        if record["step"] > self.held:
            self.run.log(scalars(record), step=record["step"])

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else None)  # a run that raised shows as failed


def wandb_history(folder: Path) -> list[dict]:
    """History rows (`step` and the logged values) of one W&B run folder, read by W&B's own reader
    (`wandb leet inspect --json`); a killed run's folder holds what wandb-core had written."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false"}
    text = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(folder)],
                          env=env, capture_output=True, text=True, check=True).stdout
    rows = []
    for line in text.splitlines():
        entry = json.loads(line)
        if entry.get("type") == "history":
            history = entry["history"]
            rows.append({**history.get("item", {}), "step": int(history.get("step", {}).get("num", 0))})
    return rows


class Trackio:
    def __init__(self, config, out: Path, step: int):
        import trackio

        self.name, self.held = run_identity(out)["name"], 0
        try:
            runs = list(trackio.Api().runs(PROJECT))
        except ValueError:  # no project yet: nothing was stored
            runs = []
        for run in runs:
            if run.name == self.name:  # rewritten from metrics.jsonl: no step past the checkpoint stays
                run.delete()
        self.run = trackio.init(project=PROJECT, name=self.name, config=dataclasses.asdict(config))

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self, failed: bool = False) -> None:
        self.run.finish()


TOOLS = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}


class Trackers:
    """The run's trackers; `with trackers:` closes them however the block ends."""

    def __init__(self, trackers=()):
        self.trackers = list(trackers)

    def log(self, record: dict) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.close(failed)
        self.trackers = []

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        self.close(failed=kind is not None)


def open_trackers(config, out: Path, step: int) -> Trackers:
    """Open `config.report_to`'s trackers for a run at `step` (0, or the checkpoint it resumed from)
    and replay the metrics.jsonl records up to `step` each one lacks. Rank 0 only."""
    out = Path(out)
    opened = Trackers([TOOLS[name](config, out, step) for name in config.report_to if name != "none"])
    file = out / "metrics.jsonl"
    lines = file.read_text().splitlines() if opened.trackers and step and file.is_file() else []
    for record in (json.loads(line) for line in lines if line.strip()):
        for tracker in opened.trackers:
            if tracker.held < record["step"] <= step:
                tracker.log(record)
    return opened
