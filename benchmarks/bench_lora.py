"""Forward + backward of one LoRA layer against a plain Linear and PEFT's LoRA layer.

Per row: median and spread (min..max) of the wall time of forward + backward (the base weight is
frozen, the input needs its gradient, as inside a network), and the activation memory kept for
backward: the bytes of the tensors autograd saves that are not parameters (measured with
`torch.autograd.graph.saved_tensors_hooks`, the same on every device), plus the CUDA peak on a GPU.
The device's name is in every row.

    python benchmarks/bench_lora.py [--tokens 2048 --features 1024 --r 16 --repeats 20]
"""
import argparse
import statistics
import time

import torch
from torch import nn

from minidpo.lora import LoRALinear


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def build(provider: str, features: int, r: int, dtype, device):
    """(layer, trainable parameters) with a frozen base in `dtype` and fp32 adapters."""
    torch.manual_seed(0)
    base = nn.Linear(features, features, bias=False, device=device, dtype=dtype).requires_grad_(False)
    if provider == "linear":
        return base, []
    if provider == "peft":
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear

        layer = PeftLinear(base, "default", LoraConfig(r=r, lora_alpha=2 * r), r=r, lora_alpha=2 * r)
        layer.lora_A.float(), layer.lora_B.float()  # as PEFT's autocast_adapter_dtype does
        ab = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    else:
        layer = LoRALinear(base, r=r, alpha=2 * r)
        ab = [layer.lora_A.weight, layer.lora_B.weight]
        if provider == "minidpo-merged":
            layer.merge()
    with torch.no_grad():
        ab[1].normal_(std=0.02)  # a trained-looking B: the zero init could be special-cased
    return layer, ab


def saved_bytes(layer, x) -> int:
    """Bytes autograd keeps for backward, parameters excluded (each storage counted once)."""
    params = {p.data_ptr() for p in layer.parameters()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).float().sum()
    return sum(seen.values())


def time_step(layer, x, repeats: int, sync):
    times = []
    for i in range(repeats + 2):  # two warm-up steps
        x.grad = None
        sync()
        t0 = time.perf_counter()
        layer(x).float().sum().backward()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated base dtypes; default float32,bfloat16 on CUDA, float32 on CPU "
                        "(CPUs without bf16 units take seconds per bf16 step)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.dtypes is None:
        args.dtypes = "float32,bfloat16" if device.type == "cuda" else "float32"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"| device | base dtype | layer | tokens x features | r | fwd+bwd ms (median, min..max) "
          f"| saved for backward MiB | CUDA peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for provider in ("linear", "minidpo", "minidpo-merged", "peft"):
            layer, _ = build(provider, args.features, args.r, dtype, device)
            x = torch.randn(args.tokens, args.features, device=device, dtype=dtype, requires_grad=True)
            saved = saved_bytes(layer, x) / 2**20
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = [t * 1e3 for t in time_step(layer, x, args.repeats, sync)]
            peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.1f}" if device.type == "cuda" else "n/a"
            print(f"| {device_name(device)} | {dtype_name} | {provider} | {args.tokens} x {args.features} "
                  f"| {args.r} | {statistics.median(times):.2f} ({min(times):.2f}..{max(times):.2f}) "
                  f"| {saved:.1f} | {peak} |")


if __name__ == "__main__":
    main()
