"""The GPU path, proven on CPU: which attention calls carry a mask (none on the common paths, each
remaining one named), left-padded generation without masks, FlexAttention that compiles once,
LoRA's dtype under autocast, and the GPU check script's CPU smoke mode.

"Today's path" below is the dense boolean mask every call took before (attention_mask_4d for
unshared rows, packed_attention_mask for packed ones): the mask-free routes must give the same
log-probs and gradients (fp32, 1e-5).
"""
import importlib
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_hf_mistral
from minidpo import load_model
from minidpo import model as M
from minidpo import prefix as P
from minidpo.data import TokenizedPair
from minidpo.lora import apply_lora, lora_layers

T = importlib.import_module("minidpo.train")
ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
LAYERS = TINY["num_hidden_layers"]

pytestmark = pytest.mark.usefixtures("one_thread")


def random_pairs(seed, shapes):
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(1, VOCAB) for _ in range(n)]  # noqa: E731
    return [TokenizedPair(ids(n), ids(c), ids(r), "random", i) for i, (n, c, r) in enumerate(shapes)]


PADDED = [(9, 3, 7), (4, 6, 1), (1, 5, 5), (7, 2, 9)]  # rows of different lengths: right padding
UNPADDED = [(5, 4, 4), (3, 6, 6)]  # every unshared row 9 tokens, every packed row 13


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_path")
    for window in (None, 4):
        make_hf_mistral(root / f"w{window}", sliding_window=window, **TINY)
    return root


def build(folders, window, full):
    """-> (policy, reference): a full fine-tune's reference is a frozen copy, LoRA's is itself."""
    model = load_model(folders / f"w{window}")
    if full:
        return model.requires_grad_(True).train(), load_model(folders / f"w{window}").eval()
    apply_lora(model, r=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.1)
    return model.train(), None


class Recorder:
    """Every scaled_dot_product_attention call, and each call of minidpo.model.sdpa with its reason."""

    def __init__(self, monkeypatch):
        self.raw, self.named = [], []
        real_f, real_sdpa = torch.nn.functional.scaled_dot_product_attention, M.sdpa

        def raw(q, k, v, attn_mask=None, *args, **kwargs):
            self.raw.append(attn_mask is not None)
            return real_f(q, k, v, attn_mask, *args, **kwargs)

        def named(q, k, v, *, mask=None, causal=False, gqa=False, reason=None):
            self.named.append((mask is not None, causal, reason))
            return real_sdpa(q, k, v, mask=mask, causal=causal, gqa=gqa, reason=reason)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", raw)
        monkeypatch.setattr(M, "sdpa", named)

    def masked_reasons(self):
        assert len(self.raw) == len(self.named), "an SDPA call bypassed minidpo.model.sdpa"
        assert [m for m, _, _ in self.named] == self.raw
        return [reason for masked, _, reason in self.named if masked]


def old_path(monkeypatch):
    """Route every attention call through today's dense boolean masks."""
    monkeypatch.setattr(M, "attention_plan", lambda mask, q_len: M.MaskedAttention(
        lambda window: M.attention_mask_4d(mask, q_len, window), "old"))

    class DensePacked:
        def __init__(self, segments):
            index = torch.arange(segments.shape[1])[None]
            chosen = (segments == P.CHOSEN).sum(1, keepdim=True)
            self.segments = segments  # positions: indices, minus the chosen reply's length when rejected
            self.positions = torch.where(segments == P.REJECTED, index - chosen,
                                         torch.where(segments == P.PAD, 0, index))

        def __call__(self, q, k, v, *, window=None, enable_gqa=False):
            mask = P.packed_attention_mask(self.segments, self.positions, window)
            return M.sdpa(q, k, v, mask=mask, gqa=enable_gqa, reason="old")

    monkeypatch.setattr(P, "PackedAttention", DensePacked)


def dpo_step_grads(model, reference, batch):
    """One dpo_step (reference pass, policy forward and backward) -> (metrics, {name: grad})."""
    config = T.TrainConfig(model="m", data=["d"], out="o", batch_size=batch["input_ids"].shape[0], lr=1e-3)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    metrics = T.dpo_step(model, [batch], config, reference)
    return metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


SCENARIOS = [  # (name, window, full, packed, shapes, masked calls per step and their reason)
    ("lora_unpacked_padded", None, False, False, PADDED, {}),
    ("lora_unpacked_unpadded", None, False, False, UNPADDED, {}),
    ("lora_packed_padded", None, False, True, PADDED, {}),
    ("full_unpacked_padded", None, True, False, PADDED, {}),
    ("full_packed_unpadded", None, True, True, UNPADDED, {}),
    # A window of 4 binds on these rows: on CPU each causal call takes a (T, T) band instead.
    # Per forward: one call per layer unshared, two (the pieces) packed; a step runs two forwards
    # (reference, policy) and the backward of the policy's.
    ("lora_unpacked_window", 4, False, False, PADDED, {M.WINDOW_ON_CPU: 2 * LAYERS}),
    ("lora_packed_window", 4, False, True, PADDED, {M.WINDOW_ON_CPU: 2 * 2 * LAYERS}),
    ("full_packed_window", 4, True, True, UNPADDED, {M.WINDOW_ON_CPU: 2 * 2 * LAYERS}),
]


@pytest.mark.parametrize("name,window,full,packed,shapes,expected", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_dpo_step_attention_calls_and_masks(folders, monkeypatch, name, window, full, packed, shapes, expected):
    pairs = random_pairs(len(name), shapes)
    batch = T.make_batch(pairs, list(range(len(pairs))), 0, "cpu", packed=packed)
    model, reference = build(folders, window, full)
    with monkeypatch.context() as m:
        calls = Recorder(m)
        metrics, grads = dpo_step_grads(model, reference, batch)
        reasons = calls.masked_reasons()
    unmasked = [c for c in calls.named if not c[0]]
    assert unmasked or expected, "no attention call was recorded"
    assert all(causal for _, causal, _ in unmasked), "an unmasked call that is not causal"
    assert {r: reasons.count(r) for r in set(reasons)} == expected, reasons
    with monkeypatch.context() as m:
        old_path(m)
        ref_metrics, ref_grads = dpo_step_grads(model, reference, batch)
    for key, value in ref_metrics.items():
        torch.testing.assert_close(metrics[key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert grads.keys() == ref_grads.keys() and grads
    for key, g in ref_grads.items():
        scale = g.abs().max().item()
        assert scale > 0, key
        torch.testing.assert_close(grads[key], g, rtol=1e-5, atol=1e-5 * scale, msg=key)


@pytest.mark.parametrize("route", ["cuda", "cpu"])
def test_left_padded_generation(folders, monkeypatch, route):
    """Prefill of left-padded prompts and one-token decode steps, with and without a binding
    window, give today's dense-mask logits at every real position. The CUDA route takes no mask
    (one call per pad count, pads sliced off); on CPU one named masked call per layer is faster."""
    if route == "cuda":
        monkeypatch.setattr(M, "PAD_GROUP_DEVICES", ("cpu",))
    for window in (None, 4):
        model = load_model(folders / f"w{window}").eval()
        ids = torch.randint(1, VOCAB, (4, 9), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        mask[0, :3], mask[2, :3], mask[3, :1] = 0, 0, 0  # 3, 0, 3, 1 pads: rows 0 and 2 are one group

        def decode(plan_patch):
            with monkeypatch.context() as m:
                if plan_patch:
                    old_path(m)
                calls = Recorder(m)
                with torch.no_grad():
                    cache = model.new_cache(4, 12)
                    out = [model(ids, attention_mask=mask, cache=cache)]
                    full = mask
                    for t in range(3):
                        full = torch.cat([full, torch.ones(4, 1, dtype=torch.long)], 1)
                        out.append(model(ids[:, t:t + 1], attention_mask=full, cache=cache))
                return torch.cat(out, 1), calls

        got, calls = decode(False)
        ref, _ = decode(True)
        reasons = calls.masked_reasons()
        if route == "cpu":
            assert reasons == [M.LEFT_PAD_ON_CPU] * 4 * LAYERS, reasons  # prefill and 3 decode steps
        else:
            # Only the prefill of a binding window (on CPU here) needs a band, once per pad count
            # (3, 0, 1) and layer; decode steps slice their keys to the window instead.
            assert reasons == ([M.WINDOW_ON_CPU] * 3 * LAYERS if window else []), reasons
        real = torch.cat([mask, torch.ones(4, 3, dtype=torch.long)], 1).bool()
        torch.testing.assert_close(got[real], ref[real], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(got).all()


def test_holes_and_chunked_prefill_are_named(folders, monkeypatch):
    model = load_model(folders / "wNone").eval()
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    holes = torch.ones_like(ids)
    holes[0, 3] = 0
    with monkeypatch.context() as m, torch.no_grad():
        calls = Recorder(m)
        model(ids, attention_mask=holes)
        cache = model.new_cache(2, 8)
        model(ids[:, :4], cache=cache)
        model(ids[:, 4:], cache=cache)  # four new tokens after four cached ones
    assert calls.masked_reasons() == [M.HOLES] * LAYERS + [M.CHUNKED_PREFILL] * LAYERS


def test_layer_window_is_each_layers_own(folders, monkeypatch):
    """Contract 1: every attention path asks MistralConfig.layer_window(i) for layer i's window."""
    model = load_model(folders / "w4")
    windows = {0: None, 1: 3}
    monkeypatch.setattr(type(model.config), "layer_window", lambda self, i: windows[i])
    model = M.Mistral(model.config)
    assert [layer.self_attn.window for layer in model.model.layers] == [None, 3]
    seen = []
    real = M.causal_attention
    monkeypatch.setattr(M, "causal_attention", lambda q, k, v, *, window=None, enable_gqa=False:
                        seen.append(window) or real(q, k, v, window=window, enable_gqa=enable_gqa))
    monkeypatch.setattr(P, "causal_attention", M.causal_attention)
    pairs = random_pairs(1, PADDED)
    with torch.no_grad():
        model(torch.randint(1, VOCAB, (2, 6)))
        P.packed_logps(model, P.packed_collate(pairs, 0))
    assert seen == [None, 3] + [None, None, 3, 3]


# ---------------------------------------------------------------------------------------------------
# The CUDA routes on CPU: FlexAttention for a binding window (eager here; forward only on CPU).

def test_binding_window_on_the_flex_route_equals_the_band(folders, monkeypatch):
    model = load_model(folders / "w4").eval()
    pairs = random_pairs(4, PADDED)
    unshared = T.make_batch(pairs, list(range(4)), 0, "cpu")
    packed = T.make_batch(pairs, list(range(4)), 0, "cpu", packed=True)
    with torch.no_grad():
        ref = [T.batch_logps(model, unshared), T.batch_logps(model, packed)]
    monkeypatch.setattr(M, "FLEX_DEVICES", ("cpu",))
    monkeypatch.setattr(M, "FLEX_BACKEND", "eager")
    monkeypatch.setattr(P, "FLEX_DEVICES", ("cpu",))
    with monkeypatch.context() as m, torch.no_grad():
        calls = Recorder(m)
        got = [T.batch_logps(model, unshared), T.batch_logps(model, packed)]
    assert calls.masked_reasons() == []
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_flex_compiles_once_across_widths_and_batch_sizes(folders, monkeypatch):
    """Packed FlexAttention under torch.compile (dynamo with the eager backend: the recompiles are
    dynamo's whatever the backend) over batches of new widths and sizes: one graph for the
    attention and one for the block mask, then no recompile."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(M, "FLEX_DEVICES", ("cpu",))
    monkeypatch.setattr(M, "FLEX_BACKEND", "eager")
    monkeypatch.setattr(P, "FLEX_DEVICES", ("cpu",))
    torch._dynamo.reset()
    M._compiled.cache_clear()
    model = load_model(folders / "wNone").eval()
    before, graphs = counters["stats"]["unique_graphs"], []
    for seed, (batch_size, scale) in enumerate([(2, 10), (3, 14), (2, 25)]):
        rng = random.Random(seed)
        shapes = [(rng.randint(scale, 2 * scale), rng.randint(5, scale), rng.randint(5, scale))
                  for _ in range(batch_size)]
        pairs = random_pairs(seed, shapes)
        batch = T.make_batch(pairs, list(range(batch_size)), 0, "cpu", packed=True, attention="flex")
        with torch.no_grad():
            got = T.batch_logps(model, batch)
            ref = T.batch_logps(model, {**batch, "attention": "sdpa"})
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    torch._dynamo.reset()
    M._compiled.cache_clear()
    assert graphs == [2] * len(graphs), graphs


# ---------------------------------------------------------------------------------------------------
# LoRA under autocast: bf16 matmuls with fp32 master weights and fp32 gradients.

def test_lora_adapters_under_autocast_run_in_the_autocast_dtype():
    """CPU autocast stands in for CUDA's: the adapters compute in bf16 inside autocast (their input
    is not widened to fp32 only for autocast to narrow it again), in fp32 outside; weights and
    gradients stay fp32 in both."""
    base = torch.nn.Linear(16, 8, bias=False)
    layer = apply_lora(torch.nn.Sequential(base), r=4, alpha=8.0, targets=("0",))[0]
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    seen = {}
    for part in ("lora_A", "lora_B"):
        getattr(layer, part).register_forward_hook(
            lambda mod, args, out, part=part: seen.__setitem__(part, (args[0].dtype, out.dtype)))
    x = torch.randn(3, 16)
    layer(x).sum().backward()
    assert seen == {"lora_A": (torch.float32, torch.float32), "lora_B": (torch.float32, torch.float32)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert seen == {"lora_A": (torch.bfloat16, torch.bfloat16), "lora_B": (torch.bfloat16, torch.bfloat16)}
    layer.zero_grad()
    y.float().sum().backward()
    assert layer.lora_A.weight.dtype == layer.lora_A.weight.grad.dtype == torch.float32
    assert layer.lora_B.weight.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# The GPU check script: its CPU smoke mode runs here.

def test_gpu_check_cpu_smoke_mode(tmp_path):
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = out.read_text()
    for line in ("torch", "triton", "mm out_dtype", "FlexAttention", "no CUDA device"):
        assert line in text, text
