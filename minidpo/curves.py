"""Training curves of a sweep's rows, from their `metrics.jsonl`: did each row's DPO run learn?

    training_curves(runs) -> dict            label -> {"step": [...], key: [...] for each of CURVES}
    plot_training_curves(runs, path) -> dict the same data, drawn one panel per curve (matplotlib)

`runs` maps a row's label to its training `metrics.jsonl` (minidpo.train). Only training records
count: eval records (`eval/...` keys) and records without rewards (SFT) are not points.
"""
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

CURVES = {  # metrics.jsonl key -> panel title
    "rewards/margin": "reward margin (chosen - rejected)",
    "rewards/accuracy": "reward accuracy",
    "logps/chosen": "log-prob of the chosen reply",
    "logps/rejected": "log-prob of the rejected reply",
}


def training_curves(runs: dict) -> dict:
    """label -> {"step": [int], "rewards/margin": [float], ...}: each training record of the row's
    metrics.jsonl, in file order. FileNotFoundError or ValueError name the row and file."""
    data = {}
    for label, file in runs.items():
        file = Path(file)
        if not file.is_file():
            raise FileNotFoundError(f"training curves: row {label!r}: {file} does not exist")
        rows = {key: [] for key in ("step", *CURVES)}
        for lineno, line in enumerate(file.read_text().splitlines(), 1):
            try:
                record = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"training curves: row {label!r}: {file}:{lineno} is not JSON: {e}") from e
            if all(key in record for key in CURVES) and "step" in record:
                for key in rows:
                    rows[key].append(record[key])
        data[label] = rows
    return data


def plot_training_curves(runs: dict, path) -> dict:
    """Draw every row's curves against step, one panel per `CURVES` key, into `path` (a PNG);
    -> `training_curves(runs)`, the data drawn. Without matplotlib (the `plot` extra) nothing is
    drawn and a warning says so."""
    data = training_curves(runs)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'minidpo[plot]'): %s not drawn", path)
        return data
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for ax, (key, title) in zip(axes.flat, CURVES.items()):
        for label, rows in data.items():
            ax.plot(rows["step"], rows[key], marker="." if len(rows["step"]) < 30 else None, label=label)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle("DPO training curves per row")
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return data
