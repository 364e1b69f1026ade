"""The run's output folder: config.json (and the resume check against it), metrics.jsonl, checkpoints
(write, list, restore), final/, the progress display and the stop signals.
Imports config, scoring (to unwrap a wrapped model) and the layers below; never batching or the loop.

OUT holds `config.json`; `metrics.jsonl` (one record per optimizer step: `step`, `epoch` (steps
over steps per epoch), `examples` and `tokens` (pairs and non-pad tokens the policy processed so
far), `loss`, `rewards/{chosen,rejected,accuracy,margin}`, `logps/{chosen,rejected}` (means over
the step's pairs), `lr`, `grad_norm` (before clipping), `step_time_s`, plus the loss's own under TRL's
names: `nll_loss` where the loss adds the chosen NLL, orpo's `log_odds_ratio` and `log_odds_chosen`;
SFT records have no rewards or logps; eval records carry `step` and `eval/...` keys); `checkpoints/step-N/`
(`trainable.safetensors`; `training_state.pt`: optimizer, scheduler and every RNG state;
`state.json`: counters, the epoch's data order and the position), written to `step-N.tmp` and
renamed; `final/` (a PEFT adapter, or a Hugging Face model folder with the tokenizer files).
"""
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from minidpo import distributed, gguf
from minidpo.checkpoint import save_model
from minidpo.config import RESUMABLE_CHANGES, TrainConfig, field_defaults
from minidpo.distributed import ONE, Dist
from minidpo.files import read_json, write_atomic, write_json
from minidpo.lora import lora_layers, save_lora
from minidpo.scoring import unwrap
from minidpo.tokenizer import TOKENIZER_FILES, load_tokenizer

logger = logging.getLogger(__name__)


def prepare_out(config: TrainConfig, write: bool = True) -> Path:
    """Create OUT and write config.json (only when `write`: rank 0); a resumed run must keep the
    settings that change results (every rank checks, so all of them refuse together)."""
    out = Path(config.out)
    file = out / "config.json"
    if config.resume and file.is_file():
        before = {**field_defaults(), **read_json(file)}  # a field newer than the run: its default then
        now = dataclasses.asdict(config)
        changed = [k for k in now if k not in RESUMABLE_CHANGES and before.get(k) != now[k]]
        if changed:
            diff = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
            raise ValueError(f"{file} records other settings ({diff}); resume with the run's own settings "
                             f"or use a new --out")
    elif not config.resume and ((out / "metrics.jsonl").exists() or (out / "checkpoints").exists()):
        raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    if not write:
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_json(file, dataclasses.asdict(config))
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past `step` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line)["step"] <= step]
    if len(keep) != len(lines):
        write_atomic(path, "".join(line + "\n" for line in keep))


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@dataclass
class TrainState:
    """Where a run is; a checkpoint's `state.json`."""

    step: int = 0  # optimizer steps done
    examples: int = 0  # pairs trained on so far
    tokens: int = 0  # non-pad tokens the policy processed so far
    order_epoch: int = -1  # the epoch `order` belongs to
    order: list = field(default_factory=list)  # that epoch's batches, lists of indices into the pairs
    data_digest: str = ""  # the training pairs the indices refer to
    world_size: int = 1  # processes of the run (a resume must use as many)


def rng_state() -> dict:
    """Every RNG a step may draw from: Python, NumPy, torch CPU and CUDA."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, model, optimizer, scheduler, state: TrainState, keep: int, d: Dist = ONE) -> Path:
    """Write OUT/checkpoints/step-N/ through a temporary folder and a rename; keep the newest `keep`.

    Rank 0 writes the trainable weights (`trainable.safetensors`), the optimizer, scheduler and every
    rank's RNG states (`training_state.pt`) and `state.json`; under FSDP2 every rank writes its shards
    of the weights and optimizer states into `sharded/` (torch.distributed.checkpoint) instead.
    """
    root = out / "checkpoints"
    final = root / f"step-{state.step}"
    tmp = root / f"step-{state.step}.tmp"
    sharded = distributed.is_sharded(model)
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    if sharded:
        distributed.save_sharded(tmp / "sharded", model, optimizer)
    rngs = d.gather_objects(rng_state())
    if d.main:
        if not sharded:
            trainable = {n: p.detach().cpu().contiguous() for n, p in unwrap(model).named_parameters()
                         if p.requires_grad}
            save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": None if sharded else optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rngs}, tmp / "training_state.pt")
        write_json(tmp / "state.json", dataclasses.asdict(state), indent=None)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` folder is an interrupted write, never read)."""
    found = [p for p in (out / "checkpoints").glob("step-*") if re.fullmatch(r"step-\d+", p.name)
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path: Path, model, optimizer, scheduler, digest: str, d: Dist = ONE) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG states from `path`; -> its TrainState."""
    state = TrainState(**read_json(path / "state.json"))
    if state.data_digest != digest:
        raise ValueError(f"{path} was written for other training data (or another --fraction, "
                         f"--seed, --max-length...); resume with the run's own settings")
    if state.world_size != d.world:
        raise ValueError(f"{path} was written by a run of {state.world_size} processes; resume it with "
                         f"as many (torchrun --nproc_per_node ...), not {d.world}")
    saved = torch.load(path / "training_state.pt", weights_only=True, map_location="cpu")
    if distributed.is_sharded(model):
        distributed.load_sharded(path / "sharded", model, optimizer)
    else:
        load_trainable(path / "trainable.safetensors", unwrap(model))
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rngs = saved["rng"]  # one state per rank (a single dict in checkpoints of older versions)
    set_rng_state(rngs[d.rank] if isinstance(rngs, list) else rngs)
    logger.info("resumed from %s (step %d)", path, state.step)
    return state


def load_trainable(file: Path, model) -> None:
    """Copy a checkpoint's `trainable.safetensors` into the model's trainable parameters."""
    params = dict(model.named_parameters())
    weights = load_file(str(file))
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        raise ValueError(f"{file} holds {sorted(set(weights) ^ expected)[:4]} "
                         f"that do not match the model's trainable parameters")
    with torch.no_grad():
        for name, t in weights.items():
            params[name].copy_(t)


def save_final(out: Path, model, config: TrainConfig, folder: Path, d: Dist = ONE) -> Path:
    """OUT/final/: a PEFT adapter for LoRA runs, an HF model folder (with the tokenizer) for full ones.
    Written by rank 0; under FSDP2 the shards are gathered to it first."""
    tmp, final = out / "final.tmp", out / "final"
    gathered = None
    if distributed.is_sharded(model):  # BatchLogpsModule's keys start with "model."
        gathered = {k.removeprefix("model."): v for k, v in distributed.full_state_dict(model).items()}
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        net = unwrap(model)
        if lora_layers(net):
            save_lora(net, tmp, base_model_name_or_path=config.model)
        else:
            save_model(net, tmp, state_dict=gathered)
            if gguf.is_gguf(folder):  # the tokenizer lives in the file: write it out as HF files
                load_tokenizer(folder).save(tmp)
            for name in TOKENIZER_FILES:
                if (folder / name).is_file():
                    shutil.copy(folder / name, tmp / name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    d.barrier()
    return final


class Progress:
    """A tqdm bar (loss, reward accuracy, tokens/s) on a terminal; log lines every N steps otherwise."""

    def __init__(self, total: int, done: int, log_every: int, show: bool = True):
        self.total, self.log_every, self.show = total, log_every, show
        self.bar = None
        if show and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)

    def update(self, record: dict, step_tokens: int):
        shown = {"loss": f"{record['loss']:.4f}", "tok/s": f"{step_tokens / record['step_time_s']:.0f}"}
        if "rewards/accuracy" in record:
            shown["acc"] = f"{record['rewards/accuracy']:.2f}"
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        elif self.show and (record["step"] % self.log_every == 0 or record["step"] == self.total):
            logger.info("step %d/%d %s lr %.3g", record["step"], self.total,
                        " ".join(f"{k} {v}" for k, v in shown.items()), record["lr"])

    def close(self):
        if self.bar is not None:
            self.bar.close()


class StopSignals:
    """Within the block, SIGINT/SIGTERM set `self.received` (the loop finishes its step, checkpoints
    and returns); a second signal raises KeyboardInterrupt at once. Off the main thread: no-op."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("%s received: finishing this step, then checkpointing (send it again to abort)",
                       signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
