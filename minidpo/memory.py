"""The memory a training run needs on each device, planned from the model's config.json alone.

    memory_plan(model_config, train_config, device=..., world=1, threads=1) -> MemoryPlan
    read_model_config(path_or_repo_id)  -> MistralConfig (a hub id: only its config.json is fetched)

`python -m minidpo train ... --dry-run` prints the plan and exits, loading no weights. It counts
what the default path allocates, per device, at the longest batch `--max-length` allows:
  weights        every parameter in the run's dtype (`resolve_dtype`); a `--reference copy` twice;
  trainable      adapters (fp32: parameter, gradient, AdamW's two moments) or, for a full
                 fine-tune, AdamW's moments of every weight and the gradients (under FSDP2 a
                 1/world share, plus one gathered layer);
  activations    what autograd keeps for backward, per token and layer, op by op as the model
                 runs (RMSNorm's fp32 input, LoRA inputs and dropout masks, SDPA's q, k, v, output
                 and log-sum-exp, the SwiGLU halves), for 2 x micro-batch x max-length tokens
                 (the unshared rows; packed rows hold as many tokens at worst, plus the second
                 attention piece's gathered copies); with gradient checkpointing, one input per
                 layer plus one layer's set, recomputed in backward;
  backward       the gradients in flight at the start of backward (a few per-token tensors of the
                 widest layer) and the hidden states' gradient;
  head chunks    the fused head's fp32 [chunk, V] logits (one per CPU thread, one on CUDA) and an
                 fp32 head weight where no half matmul has fp32 output;
  CUDA runtime   the context and cuBLAS workspaces (not in torch's allocator) and 5% slack for
                 the caching allocator's fragmentation.
The planned peak is weights + trainable state + activations + the larger of backward and the head
chunks (which live while the head runs, before the layers' backward), or, for a full fine-tune,
the gradients in place of activations when larger (they fill in as activations are freed); plus
the CUDA runtime. Checked against peaks measured on CPU (tests/test_memory.py, within 20%). Not
counted: the data and tokenizer (host memory), and torch.compile's workspaces.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from minidpo.checkpoint import repo_id
from minidpo.model import MistralConfig

GIB = 1 << 30
MIB = 1 << 20
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_RUNTIME = 640 * MIB  # CUDA context, cuBLAS and cuDNN workspaces: outside torch's allocator
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # per weight: 4-bit codes, 8-bit absmax per 64, fp32 per 256
NF4_TABLE_BYTES = 4 * (16 + 256 + 1)  # fp32: the 16 NF4 values, the 8-bit absmax map, the absmax offset
ALLOCATOR_SLACK = 0.05  # the caching allocator's rounding and fragmentation


@dataclass
class MemoryPlan:
    """Planned bytes per device: `rows` (name, bytes, how it was counted) and the `peak` they make."""

    rows: list
    peak: int
    device: str
    device_memory: Optional[int]  # bytes the device has (None: unknown)
    activations_checkpointed: int  # the activations row with gradient checkpointing...
    activations_plain: int  # ... and without
    title: str = ""  # what was planned

    @property
    def fits(self) -> Optional[bool]:
        return None if self.device_memory is None else self.peak <= self.device_memory

    def table(self) -> str:
        lines = [f"memory plan per {self.device} device: {self.title}",
                 "(peak = weights + trainable state + activations + the larger of backward and head chunks)",
                 "| part | GiB | counted |", "|---|---|---|"]
        lines += [f"| {name} | {size / GIB:.2f} | {how} |" for name, size, how in self.rows]
        lines.append(f"| **peak** | **{self.peak / GIB:.2f}** | |")
        lines.append(f"activations: {self.activations_plain / GIB:.2f} GiB without gradient checkpointing, "
                     f"{self.activations_checkpointed / GIB:.2f} GiB with it")
        if self.device_memory is None:
            lines.append("fits: unknown (no GPU visible; pass --device-memory GiB)")
        else:
            verdict = "yes" if self.fits else "NO"
            lines.append(f"fits in {self.device_memory / GIB:.1f} GiB: {verdict} "
                         f"({100 * self.peak / self.device_memory:.0f}% of it)")
        return "\n".join(lines)


def read_model_config(path_or_repo_id: str) -> MistralConfig:
    """config.json of a local model folder, or of a hub repo (only that file is fetched)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return MistralConfig.from_json(path / "config.json")
    name = repo_id(path_or_repo_id)
    from huggingface_hub import hf_hub_download

    try:
        return MistralConfig.from_json(hf_hub_download(name, "config.json"))
    except (OSError, ValueError) as e:  # offline, unknown repo, gated: huggingface_hub's errors
        raise FileNotFoundError(f"cannot read config.json of {name} from the hub (offline, or no such "
                                f"repo?): {e}. Pass a local model folder instead.") from e


def linear_shapes(c: MistralConfig) -> dict:
    """(in, out) of each Linear of a decoder layer, and of the head, by module name."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h, i = c.hidden_size, c.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h), "lm_head": (h, c.vocab_size)}


def parameter_count(c: MistralConfig) -> int:
    shapes = linear_shapes(c)
    layer = sum(a * b for name, (a, b) in shapes.items() if name != "lm_head") + 2 * c.hidden_size
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    return c.vocab_size * c.hidden_size + c.num_hidden_layers * layer + c.hidden_size + head


def lora_targets(c: MistralConfig, targets) -> list:
    """The module names LoRA adapts (PEFT's suffix rule on our names); ValueError for a stray one."""
    shapes = linear_shapes(c)
    found = [name for name in shapes if any(name == t.rsplit(".", 1)[-1] for t in targets)]
    unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in shapes]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} match no Linear layer; they are named {sorted(shapes)}")
    return found


def _per_token_layer(c: MistralConfig, act: int, mask: int, adapted: list, r: int, dropout: bool,
                     full: bool) -> int:
    """Bytes one decoder layer keeps for backward per token: activations of `act` bytes, dropout
    masks of `mask` bytes (CUDA's fused dropout keeps a bool mask, CPU's the scaled noise)."""
    shapes = linear_shapes(c)
    h, i, heads = c.hidden_size, c.intermediate_size, c.num_attention_heads
    q, kv = shapes["q_proj"][1], shapes["k_proj"][1]
    norm = 4 * h + (act * h if full else 0)  # fp32 input (and, trained, its normed product)
    # A Linear keeps its input when its weight trains or an adapter reads it; with dropout each
    # adapter keeps its own dropped copy and mask, without it one input serves every reader.
    inputs = {"x": ("q_proj", "k_proj", "v_proj"), "y": ("o_proj",), "x2": ("gate_proj", "up_proj"),
              "m": ("down_proj",)}
    width = {"x": h, "y": q, "x2": h, "m": i}
    kept = 0
    for key, readers in inputs.items():
        lora = [name for name in readers if name in adapted]
        if full or (lora and not dropout):
            kept += act * width[key]
        if dropout:
            kept += len(lora) * (act + mask) * width[key]
        kept += act * r * len(lora)  # each adapter's rank-r activations
    attention = act * (2 * q + 2 * kv) + 4 * heads  # SDPA: q, k, v, output, log-sum-exp
    mlp = 3 * act * i  # silu's input, and both halves of the product
    return 2 * norm + kept + attention + mlp


def memory_plan(c: MistralConfig, config, *, device: str = "cuda", world: int = 1, threads: int = 1,
                device_memory: Optional[int] = None) -> MemoryPlan:
    """The planned per-device peak of `config` (a TrainConfig) on model `c` (see the docstring);
    `threads`: CPU threads (one head chunk each), `device_memory`: bytes for the verdict."""
    import torch

    from minidpo.logprobs import default_chunk_tokens, mm_fp32_output
    from minidpo.train import reference_mode, resolve_dtype

    dtype = str(resolve_dtype(config, torch.device(device))).removeprefix("torch.")
    wbytes, cuda = BYTES[dtype], device == "cuda"
    act, mask = (2, 1) if cuda else (wbytes, wbytes)  # bf16 autocast on CUDA
    params = parameter_count(c)
    layers, h, V = c.num_hidden_layers, c.hidden_size, c.vocab_size
    shapes = linear_shapes(c)
    rows = [("weights", params * wbytes, f"{params / 1e9:.3g}B parameters in {dtype}")]
    if getattr(config, "quantize", ""):  # NF4 with double quantization (minidpo.quant)
        linear = c.num_hidden_layers * sum(a * b for name, (a, b) in shapes.items() if name != "lm_head")
        tables = NF4_TABLE_BYTES * 7 * c.num_hidden_layers  # per weight: its code and nested map
        rows[0] = ("weights", int(linear * NF4_BITS / 8 + (params - linear) * wbytes) + tables,
                   f"{params / 1e9:.3g}B parameters: {linear / 1e9:.3g}B in NF4 ({NF4_BITS:.3f} bits), "
                   f"the rest in {dtype}")
    if reference_mode(config) == "copy":
        rows.append(("reference copy", params * wbytes, "a frozen copy of the weights"))
    adapted = [] if config.full else lora_targets(c, config.lora_targets)
    grads = 0
    if config.full:
        share = params / world + (params / layers if world > 1 else 0)
        grads = int(share * wbytes)
        note = f", 1/{world} each (FSDP2)" if world > 1 else ""
        rows.append(("optimizer", 2 * grads, "AdamW's two moments" + note))
    else:
        n = sum(config.lora_r * (a + b) * (layers if name != "lm_head" else 1)
                for name, (a, b) in shapes.items() if name in adapted)
        rows.append(("adapters", 16 * n, f"{n / 1e6:.3g}M fp32 parameters, gradients, AdamW moments"))
    fixed = sum(size for _, size, _ in rows)
    pairs = max(config.micro_batch_size // world, 1)
    rows_per_pair = 2 if config.mode == "dpo" else 1  # SFT scores the chosen rows only
    packed = config.prefix_sharing and config.mode == "dpo"
    tokens = rows_per_pair * pairs * config.max_length
    per_layer = _per_token_layer(c, act, mask, adapted, config.lora_r, config.lora_dropout > 0, config.full)
    if packed:  # the second piece's gathered q, k, v and both pieces' outputs
        per_layer += act * (shapes["q_proj"][1] + 2 * shapes["k_proj"][1]) // 2
    head = 4 * h + act * h  # the final norm's fp32 input and the hidden states the head reads
    plain = tokens * (layers * per_layer + head)
    checkpointed = tokens * (layers * act * h + head)  # each layer's input
    saved = checkpointed if config.gradient_checkpointing else plain
    rows.append(("activations", saved, f"{tokens} tokens ({pairs} pairs x {rows_per_pair} x {config.max_length}), "
                 f"{layers} layers" + (", checkpointed" if config.gradient_checkpointing else "")))
    backward = tokens * (2 * act * c.intermediate_size + act * h)
    note = "gradients in flight at the widest layer"
    if config.gradient_checkpointing:
        backward += tokens * per_layer
        note += ", and the layer recomputed"
    rows.append(("backward", backward, note))
    chunk = min(default_chunk_tokens(V, torch.device(device)), tokens)
    workers = 1 if cuda else threads
    head_bytes = workers * chunk * V * 4 + tokens * act * h  # the chunks and the hidden states' grad
    if wbytes == 2 and (not cuda or (torch.cuda.is_available() and not mm_fp32_output(device))):
        head_bytes += V * h * 4  # the fp32 head weight (`minidpo.logprobs.head_precision`)
    if config.full:  # the head weight's fp32 gradient accumulators: packed rows call the head twice
        head_bytes += workers * V * h * 4 * (2 if packed else 1)
    rows.append(("head chunks", head_bytes, f"{workers} x fp32 [{chunk}, {V}] logits"))
    peak = fixed + max(saved + max(backward, head_bytes), grads)
    if config.full:
        rows.append(("gradients", grads, "filled in as activations are freed: the peak counts the larger"))
    if cuda:
        runtime = CUDA_RUNTIME + int(ALLOCATOR_SLACK * peak)
        rows.append(("CUDA runtime", runtime, "context and workspaces, 5% allocator slack"))
        peak += runtime
    return MemoryPlan(rows=rows, peak=peak, device=device, device_memory=device_memory,
                      activations_checkpointed=checkpointed, activations_plain=plain,
                      title=f"{'full fine-tune' if config.full else f'LoRA r={config.lora_r}'}, {dtype} weights, "
                            f"{pairs} pairs per micro-batch and device, max length {config.max_length}, "
                            f"{'prefix sharing' if packed else 'unshared rows'}, {config.mode}")


def plan_for(config) -> MemoryPlan:
    """The plan of a TrainConfig: its model's config.json, the device it names (`--device cuda`
    plans a GPU run from any machine; `auto` is the visible one), torchrun's WORLD_SIZE, and
    `--device-memory` or the visible GPU's memory."""
    import torch

    model = read_model_config(config.model)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if config.device == "auto" else config.device)
    memory = int(config.device_memory * GIB) if config.device_memory else None
    if memory is None and device.type == "cuda" and torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(device.index or 0).total_memory
    plan = memory_plan(model, config, device=device.type, world=int(os.environ.get("WORLD_SIZE", "1")),
                       threads=torch.get_num_threads(), device_memory=memory)
    plan.title = f"{config.model}: {plan.title}"
    return plan
