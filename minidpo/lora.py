"""Low-rank adapters (LoRA) on the Linear layers of a model, stored in PEFT's file format.

A `LoRALinear` replaces an `nn.Linear` in place and keeps its frozen `weight` (and `bias`), so the base
state-dict keys never change; it adds `lora_A` (r, in) and `lora_B` (out, r) and computes

    y = x W^T + b + scale * dropout(x) A^T B^T,        scale = alpha / r.

The adapter path runs in the adapters' dtype (fp32 by default) and its result is cast to the output
dtype, so a bf16 base stays bf16 throughout: no fp32 copy of a base weight is ever made. Under
autocast (bf16 on CUDA, as training runs) the adapter matmuls run in the autocast dtype with fp32
accumulation, as autocast runs every matmul; the adapters' weights (the optimizer's master copy)
and their gradients stay fp32. Their input is then not widened to fp32 first: autocast would
narrow it again, and the widened copy would be kept for backward in every adapted layer.

The DPO reference model is the same model under `lora_disabled(model)`: no second copy of the weights.
Adapters are read and written as PEFT does (`adapter_config.json`, `adapter_model.safetensors`,
keys `base_model.model.<module>.lora_A.weight`), so PEFT, vLLM and friends read our files and we read
theirs.
"""
import contextlib
import math
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from minidpo.checkpoint import read_safetensors
from minidpo.files import read_json, write_json
from minidpo.quant import NF4Linear, NF4Weight

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps a LoraModel that wraps the transformers model
# PEFT's LoraConfig defaults, used when a field is absent from adapter_config.json (as PEFT does).
PEFT_DEFAULT_R, PEFT_DEFAULT_ALPHA = 8, 8
# adapter_config.json fields whose non-default values change the math; we refuse rather than ignore them.
UNSUPPORTED_FIELDS = ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "modules_to_save",
                      "layers_to_transform", "rank_pattern", "alpha_pattern", "exclude_modules",
                      "target_parameters", "trainable_token_indices", "layer_replication", "use_qalora",
                      "alora_invocation_tokens", "use_bdlora")
# init_lora_weights schemes that rewrite the base weights: the adapter only fits that rewritten base.
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")


class LoRALinear(nn.Module):
    """An `nn.Linear` with a low-rank adapter. Input (..., in) -> output (..., out) in the base dtype."""

    def __init__(self, base: nn.Linear, *, r: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: a tied head stays tied, keys stay `<name>.weight`
        self.bias = base.bias
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        device = self.weight.device
        # Built on the CPU in fp32 in PEFT's order (A, B, then A re-initialised) so that one seed gives
        # PEFT's initial adapters; built on meta straight away when the base has no data.
        build = "meta" if device.type == "meta" else "cpu"
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=build, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=build, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # the adapted model starts as the base model
        self.lora_A.to(device=device, dtype=dtype)
        self.lora_B.to(device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # True: forward is the base layer alone
        self.merged = False  # True: scale * B A has been added into `weight`

    def forward(self, x):
        if self.merged and self.disabled:
            raise RuntimeError("this LoRA layer is disabled but its adapter is merged into the weight; "
                               "call unmerge() first")
        y = F.linear(x, self.weight, self.bias)
        if self.merged or self.disabled:  # merged: the weight already holds scale * B A
            return y
        if not torch.is_autocast_enabled(x.device.type):  # under autocast: its dtype (docstring)
            x = x.to(self.lora_A.weight.dtype)
        a = self.dropout(x)
        # Scale the rank-r activations, not the (..., out) ones: same product, r/out of the work.
        delta = self.lora_B(self.lora_A(a) * self.scale)
        return y + delta.to(y.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scale * B A, (out, in), in the adapters' dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale

    @torch.no_grad()
    def merge(self):
        """Add scale * B A into `weight` (once: a second call does nothing)."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self):
        """Subtract what `merge` added (exact up to rounding in the weight's dtype; once)."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False
        return self

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, merged={self.merged}, disabled={self.disabled}")


def lora_layers(model: nn.Module) -> Dict[str, LoRALinear]:
    """Module name -> LoRA layer, in module order (empty when the model has none)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The adapter parameters (every `lora_A` and `lora_B` weight), for the optimizer."""
    return [p for layer in lora_layers(model).values()
            for p in (layer.lora_A.weight, layer.lora_B.weight)]


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with `requires_grad` (each shared Parameter counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _linear_names(model: nn.Module) -> List[str]:
    """Names of the Linear layers LoRA can go on (plain Linears and LoRA layers, not adapters' own)."""
    inner = {f"{name}.{child}" for name in lora_layers(model) for child in ("lora_A", "lora_B")}
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, NF4Linear, LoRALinear)) and name not in inner]


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of targets: the module name is the target or ends in `.target`."""
    return name == target or name.endswith("." + target)


def match_targets(model: nn.Module, targets: Sequence[str]) -> List[str]:
    """Names of the Linear layers matched by `targets`; a target matching none is a ValueError."""
    names = _linear_names(model)
    unknown = [t for t in targets if not any(_matches(n, t) for n in names)]
    if unknown:
        existing = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"LoRA targets {unknown} match no Linear layer of the model; "
                         f"its Linear layers are named {existing}")
    return [n for n in names if any(_matches(n, t) for t in targets)]


def _check_hyper(r, alpha, dropout):
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def apply_lora(model: nn.Module, *, r: int, alpha: float, dropout: float = 0.0,
               targets: Union[str, Sequence[str]] = DEFAULT_TARGETS,
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """Put a LoRA adapter on every Linear whose name ends in a target; freeze everything else.

    Adapters are created in module order from torch's global RNG (A Kaiming-uniform, B zero), in
    `dtype` (fp32 by default, also for a bf16 base) on the base weight's device. Returns `model`.
    """
    _check_hyper(r, alpha, dropout)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ValueError("LoRA targets are empty")
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; merge_lora(model) or start from the base model")
    names = match_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, LoRALinear(base, r=r, alpha=alpha, dropout=dropout, dtype=dtype))
    return model


def _require_lora(model: nn.Module, what: str) -> Dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no LoRA layers (call apply_lora or load_lora first)")
    return layers


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Within the block the model is exactly its base (the DPO reference); adapters return on exit.

    Refuses a model whose adapters are merged: subtracting them again is exact only up to rounding
    (in bf16, far from it), and the reference must be the base bit for bit.
    """
    layers = _require_lora(model, "lora_disabled")
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"lora_disabled: adapters are merged into the weights of {merged[:3]}"
                         f"{' ...' if len(merged) > 3 else ''}; unmerge them first")
    before = {name: layer.disabled for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.disabled = True
        yield model
    finally:
        for name, layer in layers.items():
            layer.disabled = before[name]


def _is_shared(model: nn.Module, param: nn.Parameter) -> bool:
    return sum(p is param for _, p in model.named_parameters(remove_duplicate=False)) > 1


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put back a plain `nn.Linear`; returns `model`.

    Afterwards no LoRA module or parameter is left, so `save_model` writes an ordinary checkpoint.
    A model without LoRA layers is returned unchanged (merging twice is merging once). Parameters
    keep their `requires_grad` (frozen after `apply_lora`).
    """
    layers = lora_layers(model)
    quantized = [name for name, layer in layers.items() if isinstance(layer.weight, NF4Weight)]
    if quantized:
        raise ValueError(f"cannot merge the adapters of {quantized[:3]}{' ...' if len(quantized) > 3 else ''}: "
                         f"their base is 4-bit NF4, which cannot hold the sum. Save the adapter (save_lora), "
                         f"load the full-precision base (load_model without quantize), load_lora it, then merge_lora")
    for name, layer in layers.items():
        if _is_shared(model, layer.weight) and not layer.merged:
            raise ValueError(f"cannot merge the adapter of {name}: its weight is shared with another "
                             f"module (tied embeddings), which the merge would change too")
    for name, layer in layers.items():
        layer.merge()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return model


def _target_modules(model: nn.Module, layers: Dict[str, LoRALinear]) -> List[str]:
    """The shortest `target_modules` list that selects exactly the adapted layers under PEFT's rule."""
    short = sorted({name.rsplit(".", 1)[-1] for name in layers})
    selected = {n for n in _linear_names(model) if any(_matches(n, t) for t in short)}
    return short if selected == set(layers) else sorted(layers)


def _same(layers: Dict[str, LoRALinear], attr: str):
    values = {getattr(layer, attr) for layer in layers.values()}
    if len(values) > 1:
        raise ValueError(f"LoRA layers differ in {attr} ({sorted(values)}); PEFT's format needs one value")
    return values.pop()


def _adapter_config(model, layers, base_model_name_or_path) -> dict:
    dropouts = {l.dropout.p if isinstance(l.dropout, nn.Dropout) else 0.0 for l in layers.values()}
    if len(dropouts) > 1:
        raise ValueError(f"LoRA layers differ in dropout ({sorted(dropouts)}); PEFT's format needs one value")
    alpha = _same(layers, "alpha")
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None),
        "revision": None, "r": _same(layers, "r"),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropouts.pop(), "target_modules": _target_modules(model, layers),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
        "lora_bias": False, "exclude_modules": None,
    }


def save_lora(model: nn.Module, directory, *, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write `adapter_model.safetensors` and `adapter_config.json` as PEFT does; returns the folder.

    Tensors are stored in the adapters' dtype under `base_model.model.<module>.lora_{A,B}.weight`.
    Each file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    layers = _require_lora(model, "save_lora")
    config = _adapter_config(model, layers, base_model_name_or_path)
    tensors = {}
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            w = getattr(layer, part).weight
            tensors[f"{PEFT_PREFIX}{name}.{part}.weight"] = w.detach().contiguous().cpu()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / WEIGHTS_NAME)
    write_json(directory / CONFIG_NAME, config, sort_keys=True)
    return directory


def _read_json_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: not a PEFT adapter folder")
    config = read_json(file)
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return config


def _check_supported(config: dict, file: Path):
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type={config['peft_type']!r}; only LORA adapters are supported")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{file}: task_type={config['task_type']!r}; only CAUSAL_LM is supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{file}: bias={config['bias']!r} is not supported (only 'none')")
    for field in UNSUPPORTED_FIELDS:
        if config.get(field):
            raise ValueError(f"{file}: {field}={config[field]!r} is not supported")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ValueError(f"{file}: init_lora_weights={init!r} rewrites the base weights; convert the "
                         f"adapter to a plain LoRA first (PEFT: path_initial_model_for_weight_conversion)")


def _config_targets(model: nn.Module, spec, file: Path) -> List[str]:
    """PEFT's `target_modules` -> module names: a list of names/suffixes, 'all-linear', or a regex."""
    if isinstance(spec, str):
        names = _linear_names(model)
        if spec.lower() == "all-linear":  # PEFT: every Linear except the output layer
            found = [n for n in names if n != "lm_head"]
        else:
            found = [n for n in names if re.fullmatch(spec, n)]
        if not found:
            raise ValueError(f"{file}: target_modules={spec!r} matches no Linear layer of the model")
        return found
    if not isinstance(spec, list) or not spec or not all(isinstance(t, str) for t in spec):
        raise ValueError(f"{file}: target_modules must be a non-empty list of names or a string, got {spec!r}")
    try:
        return match_targets(model, spec)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e


def _read_tensors(folder: Path) -> Dict[str, torch.Tensor]:
    file = folder / WEIGHTS_NAME
    if not file.is_file():
        pickles = [p.name for p in folder.glob("*.bin")]
        extra = f" (it has {pickles}: minidpo reads only safetensors)" if pickles else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder}{extra}")
    return dict(read_safetensors(file))


def _check_tensors(model, names: Iterable[str], r: int, tensors: dict, file: Path):
    """Every key must be an adapter (or a targeted base weight, as PEFT saves for lm_head) of right shape."""
    expected, optional = {}, {}
    for name in names:
        base = model.get_submodule(name)
        out_f, in_f = base.out_features, base.in_features
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (r, in_f)
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (out_f, r)
        optional[f"{PEFT_PREFIX}{name}.base_layer.weight"] = (out_f, in_f)
    shapes = {**expected, **optional}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    misshapen = [f"{k}: file {tuple(t.shape)} vs model {shapes[k]}"
                 for k, t in tensors.items() if k in shapes and tuple(t.shape) != shapes[k]]
    if missing or unexpected or misshapen:
        raise ValueError(f"adapter {file} does not fit the model (r={r}): missing {missing}, "
                         f"unexpected {unexpected}, misshapen {misshapen}")


def _check_existing(layers: Dict[str, LoRALinear], names: List[str], r, alpha, file: Path):
    """An adapter loaded into LoRA layers must have their r, alpha and targets."""
    if set(names) != set(layers):
        only_file, only_model = sorted(set(names) - set(layers)), sorted(set(layers) - set(names))
        raise ValueError(f"{file}: the adapter's targets differ from the model's LoRA layers: adapted only "
                         f"in the file {only_file[:4]}, only in the model {only_model[:4]}")
    for name, layer in layers.items():
        if layer.r != r:
            raise ValueError(f"{file}: adapter r={r} but the model's LoRA layer {name} has r={layer.r}")
        if not math.isclose(layer.alpha, alpha):
            raise ValueError(f"{file}: adapter lora_alpha={alpha} but the model's LoRA layer {name} "
                             f"has alpha={layer.alpha}")
        if layer.merged:
            raise ValueError(f"cannot load {file} into {name}: its adapter is merged; unmerge it first")


def load_lora(model: nn.Module, directory, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Read a PEFT LoRA folder into `model` and return it; strict, and all-or-nothing.

    A model without LoRA layers gets them from the config (r, lora_alpha, lora_dropout,
    target_modules); a model with LoRA layers must already have that r, alpha and those targets.
    New adapters are made in `dtype`; tensors are cast to the adapters' dtype. A
    `<module>.base_layer.weight` tensor (PEFT stores one when `lm_head` is targeted) is copied into
    the base weight, as PEFT does.
    """
    folder = Path(directory)
    config = _read_json_config(folder)
    file = folder / CONFIG_NAME
    _check_supported(config, file)
    r = config.get("r", PEFT_DEFAULT_R)
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    dropout = config.get("lora_dropout", 0.0)
    try:
        _check_hyper(r, alpha, dropout)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e
    if "target_modules" not in config:
        raise ValueError(f"{file} has no target_modules")
    names = _config_targets(model, config["target_modules"], file)
    tensors = _read_tensors(folder)
    _check_tensors(model, names, r, tensors, folder / WEIGHTS_NAME)
    layers = lora_layers(model)
    if layers:
        _check_existing(layers, names, r, alpha, file)
    else:
        apply_lora(model, r=r, alpha=alpha, dropout=dropout, targets=names, dtype=dtype)
        layers = lora_layers(model)
    with torch.no_grad():
        for key, t in tensors.items():
            name, _, part = key[len(PEFT_PREFIX):].rpartition(".")[0].rpartition(".")
            layer = layers[name]
            target = layer.weight if part == "base_layer" else getattr(layer, part).weight
            target.copy_(t)
    return model
