"""A training run's settings: `TrainConfig` (one field each, checked in `__post_init__`) and the
`train`/`sft` command line built from its fields (flag help from each field's `metadata["help"]`).
Imports only the modules below the loop (loss, lora, tokenizer, tracking): every training module may import it.
"""
import argparse
import dataclasses
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from minidpo import tracking
from minidpo.lora import DEFAULT_TARGETS
from minidpo.loss import LOSS_TYPES, needs_reference, nll_weight
from minidpo.tokenizer import TEMPLATES

MODES = ("dpo", "sft")
SCHEDULES = ("cosine", "linear", "constant")
REFERENCES = ("auto", "adapter-off", "copy", "precomputed")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CHOICES = {"mode": MODES, "loss": LOSS_TYPES, "schedule": SCHEDULES, "reference": REFERENCES,
           "dtype": DTYPES, "template": ("",) + tuple(TEMPLATES), "prefix_attention": ("sdpa", "flex"),
           "quantize": ("", "nf4")}
# Fields a resumed run may change: they do not change what is computed.
RESUMABLE_CHANGES = ("resume", "save_every", "keep_checkpoints", "log_every", "eval_every", "device",
                     "dist_timeout", "report_to", "dry_run", "device_memory")
CLI_HIDDEN = ("mode",)  # set by the command (train or sft), not by a flag


def opt(default=dataclasses.MISSING, help: str = "", *, factory=dataclasses.MISSING):
    """A TrainConfig field; `help` is its flag's help text (other tools read `metadata["help"]` too)."""
    return field(default=default, default_factory=factory, metadata={"help": help})


@dataclass
class TrainConfig:
    """One training run. Fields become `--flags`; each field's `help` (its metadata) is the flag's help."""

    model: str = opt(
        help="Hugging Face model folder, hub repo id or .gguf file: the starting policy and the reference")
    data: list[str] = opt(help="preference data sources LOCATION[::FORMAT] (see minidpo.data); several pool")
    out: str = opt(help="output folder: config.json, metrics.jsonl, checkpoints/, final/")
    mode: str = opt("dpo", "dpo (preference loss) or sft (NLL of the chosen reply); set by the command")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: float = opt(32.0, "LoRA scale numerator: scale = alpha / r")
    lora_dropout: float = opt(0.05, "dropout on the adapters' input (policy only: the reference has none)")
    lora_targets: list[str] = opt(help="modules given adapters", factory=lambda: list(DEFAULT_TARGETS))
    full: bool = opt(False, "full fine-tune (every weight trains) instead of LoRA")
    quantize: str = opt("", "nf4: keep the frozen base's Linear weights in 4-bit NF4 (QLoRA; LoRA only)")
    beta: float = opt(0.1, "DPO temperature beta (orpo: the odds-ratio weight lambda; simpo, cpo: the reward scale)")
    loss: str = opt("sigmoid", "preference loss, TRL's names (see minidpo.loss); simpo, cpo, orpo use no reference")
    label_smoothing: float = opt(0.0,
        "assumed share of flipped labels (sigmoid: cDPO, robust, exo_pair, aot, simpo, cpo)")
    rpo_alpha: float = opt(0.0, "weight of the chosen replies' NLL per token added to a loss with a reference (RPO)")
    simpo_gamma: float = opt(0.5, "SimPO's target reward margin gamma (simpo only)")
    cpo_alpha: float = opt(None, "weight of the chosen NLL per token in cpo, simpo (unset: 1 for cpo, 0 for simpo)")
    lr: float = opt(5e-5, "peak learning rate of AdamW")
    schedule: str = opt("cosine", "learning rate after the warmup")
    warmup_ratio: float = opt(0.1, "share of the steps spent warming the learning rate up linearly")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0: no clipping; the norm is logged)")
    batch_size: int = opt(8, "pairs per optimizer step (global)")
    grad_accum: int = opt(1, "micro-batches per optimizer step; must divide batch_size")
    max_steps: int = opt(0, "optimizer steps to run (0: `epochs` passes over the training pairs)")
    epochs: int = opt(1, "passes over the training pairs when max_steps is 0")
    max_length: int = opt(1024, "tokens per row (prompt + reply); longer replies are cut")
    max_prompt_length: int = opt(0, "prompt tokens kept (its end); 0: half of max_length")
    fraction: float = opt(1.0, "share of the non-eval pairs to train on (nested subsets for one seed)")
    eval_fraction: float = opt(0.0, "share of the pooled pairs held out for evaluation (0: no eval)")
    eval_every: int = opt(0, "evaluate every N steps (0: only after the last step)")
    group_by_length: bool = opt(True, "batch pairs of similar length together (less padding)")
    drop_ties: bool = opt(False, "drop ultrafeedback pairs whose ratings are equal")
    seed: int = opt(0, "seeds the eval split, the subset, the data order, LoRA init and dropout")
    save_every: int = opt(0, "checkpoint every N steps (0: none, except when stopped by a signal)")
    keep_checkpoints: int = opt(2, "newest checkpoints kept")
    resume: bool = opt(False, "continue from the newest checkpoint in OUT/checkpoints")
    reference: str = opt("auto", "auto: adapter-off for LoRA, copy for full fine-tunes")
    ref_cache_dir: str = opt("",
        "precomputed references (\"\": $MINIDPO_CACHE/reference or ~/.cache/minidpo/reference)")
    dtype: str = opt("auto", "weight dtype (auto: bfloat16 for a LoRA base on CUDA, else float32)")
    device: str = opt("auto", "torch device (auto: cuda when available, else cpu)")
    gradient_checkpointing: bool = opt(False, "recompute each layer's activations in backward (less memory)")
    prefix_sharing: bool = opt(True,
        "DPO: one row per pair, its prompt computed once (timings: benchmarks/RESULTS.md)")
    prefix_attention: str = opt("sdpa",
        "packed rows' attention: sdpa, or flex (FlexAttention; CUDA only, unmeasured)")
    template: str = opt("", "built-in chat template to use instead of the model folder's own")
    log_every: int = opt(1, "without a terminal, log a line every N steps")
    dist_timeout: float = opt(1800.0,
        "torchrun: seconds a collective waits for the other processes before the job ends")
    report_to: list[str] = opt(
        help="trackers fed metrics.jsonl: tensorboard, wandb, trackio (several) or none", factory=lambda: ["none"])
    dry_run: bool = opt(False, "print the planned memory per device (from --model's config.json alone) and exit")
    device_memory: float = opt(0.0, "GiB per device the --dry-run plan must fit (0: the visible GPU's)")

    def __post_init__(self):
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t for t in self.lora_targets.split(",") if t]
        self.lora_targets = [t for item in self.lora_targets for t in str(item).split(",") if t]
        self.data, self.model, self.out = [str(d) for d in self.data], str(self.model), str(self.out)
        self.report_to = tracking.check_report_to(self.report_to)
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}; choose one of {list(choices)}")
        for name in ("model", "out"):
            if not getattr(self, name):
                raise ValueError(f"TrainConfig.{name} is required")
        if not self.data:
            raise ValueError("TrainConfig.data: give at least one data source")
        self._check_numbers()
        self._check_loss()
        if self.full and self.quantize:
            raise ValueError(f"TrainConfig.quantize={self.quantize!r} needs LoRA: a full fine-tune trains the "
                             f"base weights, which a 4-bit base cannot hold; drop --full or --quantize")
        if self.full and self.reference == "adapter-off":
            raise ValueError("TrainConfig.reference='adapter-off' needs LoRA; a full fine-tune uses "
                             "'copy' or 'precomputed'")

    def _check_numbers(self):
        checks = {
            "lora_r": self.lora_r >= 1, "lora_alpha": self.lora_alpha > 0,
            "lora_dropout": 0 <= self.lora_dropout < 1, "lora_targets": bool(self.lora_targets),
            "beta": 0 < self.beta < math.inf, "label_smoothing": 0 <= self.label_smoothing < 0.5,
            "lr": 0 < self.lr < math.inf, "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "weight_decay": self.weight_decay >= 0, "max_grad_norm": self.max_grad_norm >= 0,
            "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1,
            "max_steps": self.max_steps >= 0, "epochs": self.epochs >= 1,
            "max_length": self.max_length >= 2,
            "max_prompt_length": 0 <= self.max_prompt_length < self.max_length,
            "fraction": 0 < self.fraction <= 1, "eval_fraction": 0 <= self.eval_fraction < 1,
            "eval_every": self.eval_every >= 0, "save_every": self.save_every >= 0,
            "keep_checkpoints": self.keep_checkpoints >= 1, "log_every": self.log_every >= 1,
            "dist_timeout": 0 < self.dist_timeout < math.inf, "device_memory": self.device_memory >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError("TrainConfig: out of range: " + ", ".join(
                f"{name}={getattr(self, name)!r}" for name in bad) + "; see `--help` for the ranges")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} is not a multiple of "
                             f"grad_accum={self.grad_accum}")

    def _check_loss(self):
        """The loss's options as TRL's trainers check them, plus those that mean nothing for the loss."""
        if self.cpo_alpha is None:  # the loss's own default (TRL's CPOConfig: 1; SimPO has no NLL)
            self.cpo_alpha = 1.0 if self.loss == "cpo" else 0.0
        try:
            nll_weight(self.loss, beta=self.beta, label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma,
                       cpo_alpha=self.cpo_alpha, rpo_alpha=self.rpo_alpha)
        except ValueError as e:
            raise ValueError(f"TrainConfig: {e}") from None
        if not needs_reference(self.loss) and self.reference != "auto":
            raise ValueError(f"TrainConfig.reference={self.reference!r}: loss {self.loss!r} uses no reference "
                             f"model; leave --reference at auto")

    @property
    def prompt_limit(self) -> int:
        """Prompt tokens kept: max_prompt_length, or half of max_length when it is 0."""
        return self.max_prompt_length or self.max_length // 2

    @property
    def micro_batch_size(self) -> int:
        """Pairs per forward pass."""
        return self.batch_size // self.grad_accum


def reference_mode(config: TrainConfig) -> Optional[str]:
    """The reference actually used: None for SFT and reference-free losses; `auto` resolved."""
    if config.mode == "sft" or not needs_reference(config.loss):
        return None
    if config.reference == "auto":
        return "copy" if config.full else "adapter-off"
    return config.reference


def field_defaults() -> dict:
    """Field name -> its default (required fields left out): what a config.json lacking a newer field meant."""
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(TrainConfig)
            if not (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)}


def add_flags(parser, *, skip=(), dest_prefix: str = "", show_defaults: bool = True) -> None:
    """One flag per TrainConfig field not in `skip`: `--lora-r`, bools as `--x/--no-x`, lists as `--x a b`.
    Values land in `dest_prefix + field name`; an unset flag sets nothing (TrainConfig's default, or
    the caller's, applies: one source of truth)."""
    defaults = field_defaults()
    for f in dataclasses.fields(TrainConfig):
        if f.name in CLI_HIDDEN or f.name in skip:
            continue
        required = f.name not in defaults
        text = f.metadata["help"] + (f" (default: {defaults[f.name]!r})" if show_defaults and not required else "")
        kwargs = {"dest": dest_prefix + f.name, "help": text.replace("%", "%%"),  # argparse formats help with %
                  "default": argparse.SUPPRESS}
        if f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.type == list[str]:
            kwargs.update(nargs="+", type=str)
        else:
            kwargs["type"] = f.type
        if f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
        else:
            kwargs["metavar"] = f.name.upper()
        if required:
            kwargs["required"] = True
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def build_parser(command: str = "train") -> argparse.ArgumentParser:
    """The `train`/`sft` command line: a flag per TrainConfig field (`add_flags`)."""
    what = "DPO on preference pairs" if command == "train" else "SFT on the chosen replies of preference pairs"
    parser = argparse.ArgumentParser(prog=f"python -m minidpo {command}", description=f"minidpo: {what}.")
    add_flags(parser)
    return parser


def parse_config(argv=None, command: str = "train") -> TrainConfig:
    """Command-line arguments -> TrainConfig (mode from the command); bad values exit with usage."""
    if command not in ("train", "sft"):
        raise ValueError(f"command must be 'train' or 'sft', got {command!r}")
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        return TrainConfig(mode="dpo" if command == "train" else "sft", **vars(args))
    except ValueError as e:
        parser.error(str(e))


def config_argv(config: TrainConfig) -> list[str]:
    """The flags that rebuild `config` through `parse_config` (every field, defaults included)."""
    argv = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in CLI_HIDDEN:
            continue
        flag, value = "--" + f.name.replace("_", "-"), getattr(config, f.name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


def resume_command(config: TrainConfig) -> str:
    """The shell command that continues this run."""
    command = "train" if config.mode == "dpo" else "sft"
    argv = config_argv(dataclasses.replace(config, resume=True))
    return " ".join(["python -m minidpo", command, *map(shlex.quote, argv)])
