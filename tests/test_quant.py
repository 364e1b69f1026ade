"""NF4 (QLoRA's 4-bit base) against bitsandbytes bit for bit, against torchao within its own tolerance,
the Triton kernel, checkpoints quantized by bitsandbytes/transformers, and LoRA DPO on an NF4 base."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_mistral
from safetensors.torch import load_file

import minidpo
from minidpo.lora import apply_lora, lora_disabled, lora_layers, lora_parameters, merge_lora
from minidpo.quant import NF4Linear, NF4Weight, dynamic_map, from_bnb, quantize_nf4

bnb_functional = pytest.importorskip("bitsandbytes.functional")  # a test requirement; never skipped there

REPO = Path(__file__).resolve().parent.parent
SHAPES = [((96, 70), torch.bfloat16), ((64, 64), torch.float32), ((33, 17), torch.float16),
          ((300, 1001), torch.float32), ((1, 3), torch.bfloat16), ((4096,), torch.float16)]

pytestmark = pytest.mark.usefixtures("one_thread")


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def _bnb(w, double_quant):
    return bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)


# ---------------------------------------------------------------- bitsandbytes, bit for bit


@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_codes_and_absmax_equal_bitsandbytes(shape, dtype):
    w = _weight(shape, dtype)
    packed, state = _bnb(w, double_quant=False)
    ours = quantize_nf4(w)
    assert ours.packed.dtype == torch.uint8 and ours.packed.shape == packed.shape
    assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.code, state.code) and ours.shape == w.shape
    # (bitsandbytes returns a 1-D weight as a row: [1, n])
    assert torch.equal(ours.dequantize(), bnb_functional.dequantize_4bit(packed, state).view(shape))
    state.dtype = torch.float32  # into another dtype: bitsandbytes' fp32 products, rounded once
    fp32 = bnb_functional.dequantize_4bit(packed, state).view(shape)
    assert torch.equal(ours.dequantize(torch.float32), fp32)
    assert torch.equal(ours.dequantize(torch.bfloat16), fp32.bfloat16())
    assert (fp32 - w.float()).abs().max() <= 0.2 * w.float().abs().max()


@pytest.mark.parametrize("shape,dtype", SHAPES[:4])
def test_double_quantization_equals_bitsandbytes(shape, dtype):
    w = _weight(shape, dtype, seed=1)
    packed, state = _bnb(w, double_quant=True)
    ours = quantize_nf4(w, double_quant=True)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.nested_absmax, state.state2.absmax) and torch.equal(ours.offset, state.offset)
    assert torch.equal(ours.nested_code, state.state2.code) and torch.equal(dynamic_map(), bnb_functional.create_dynamic_map())
    # The 8-bit indices equal bitsandbytes' own torch kernel of quantize_blockwise exactly...
    _, plain = _bnb(w, double_quant=False)
    centred = plain.absmax - plain.absmax.mean()
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    portable, nested = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        keys, centred, bnb_functional.create_dynamic_map(), 256)
    assert torch.equal(ours.absmax, portable) and torch.equal(ours.nested_absmax, nested)
    # ...while its native CPU kernel multiplies by an approximate reciprocal (SIMD rcp), so a few
    # indices whose value lies within ~2% of a midpoint land one step away.
    step = (ours.absmax.int() - state.absmax.int()).abs()
    assert step.max() <= 1 and (step > 0).float().mean() < 0.01
    # Dequantizing: our weight through bitsandbytes' dequantize_4bit gives our bits.
    state.absmax = ours.absmax
    assert torch.equal(bnb_functional.dequantize_4bit(packed, state), ours.dequantize())
    bits = sum(b.numel() * b.element_size() * 8 for b in ours.buffers()) / w.numel()
    assert 4.1 < bits < 4.5 or w.numel() < 64 * 256


def test_bitsandbytes_state_loads_to_the_same_weights():
    w = _weight((128, 192), torch.bfloat16, seed=2)
    for double_quant in (False, True):
        packed, state = _bnb(w, double_quant)
        parts = {"": packed, **{k.removeprefix("weight."): v for k, v in state.as_dict(packed=True).items()}}
        loaded = from_bnb("w", parts)
        assert torch.equal(loaded.dequantize(), bnb_functional.dequantize_4bit(packed, state))
        assert loaded.dtype == torch.bfloat16 and loaded.double_quant == double_quant


def test_torchao_nf4_is_as_close_as_its_own_tests_require():
    """torchao's test_reconstruction_qlora_vs_bnb: both max reconstruction errors < 1 and within
    0.2 of each other, on a 512 x 512 N(0, 1) bf16 weight. They differ by design: torchao keeps the
    NF4 code in the weight's dtype (bf16 here: rounded code values), divides by absmax where
    bitsandbytes multiplies by its reciprocal, picks the nearest code by argmin, and double-quantizes
    absmax linearly to int8 where bitsandbytes uses its 8-bit dynamic map."""
    nf4_tensor = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = nf4_tensor.to_nf4(w, 64, 256).get_original_weight()
    ours = quantize_nf4(w, double_quant=True).dequantize()
    err_ours, err_theirs = (ours.float() - w.float()).abs().max(), (theirs.float() - w.float()).abs().max()
    assert err_ours < 1 and err_theirs < 1 and (err_ours - err_theirs).abs() < 0.2
    assert (ours.float() - theirs.float()).abs().mean() < 0.01 * w.float().abs().mean()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="block_size=48"):
        quantize_nf4(torch.randn(64), block_size=48)
    with pytest.raises(ValueError, match="floating-point"):
        quantize_nf4(torch.ones(64, dtype=torch.int64))
    with pytest.raises(TypeError, match="only F.linear"):
        torch.matmul(torch.randn(2, 64), quantize_nf4(torch.randn(64, 64)))


# ---------------------------------------------------------------- the layer


def _saved_sizes(fn):
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        out = fn()
    return out, sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_is_linear_on_the_dequantized_weight(dtype):
    w = _weight((48, 64), torch.float32, seed=4)
    layer = NF4Linear(quantize_nf4(w, double_quant=True), torch.nn.Parameter(torch.randn(48)))
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    dense, bias = layer.weight.dequantize(dtype), layer.bias.detach().clone().requires_grad_()
    y, saved = _saved_sizes(lambda: layer(x))
    assert max(saved, default=0) < w.numel()  # no full-size weight kept for backward
    y_ref = F.linear(x_ref, dense, bias.to(dtype))
    assert y.dtype == dtype and torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.bias.grad, bias.grad.to(layer.bias.dtype))
    assert all(b.grad is None for b in layer.weight.buffers())


def test_lora_wraps_the_nf4_layer_unchanged(tiny_dir):
    model = minidpo.load_model(tiny_dir, quantize="nf4")
    apply_lora(model, r=4, alpha=8)
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert isinstance(layer.weight, NF4Weight)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.1)
    x = torch.randn(2, 5, layer.in_features)
    dense = layer.weight.dequantize(torch.float32)
    with torch.no_grad():
        expected = F.linear(x, dense) + layer.lora_B(layer.lora_A(x)) * layer.scale
        torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
        ids = torch.randint(0, 128, (2, 7))
        with lora_disabled(model):
            off = model(ids)
        base = minidpo.load_model(tiny_dir, quantize="nf4")(ids)
    assert torch.equal(off, base)
    with pytest.raises(ValueError, match="load the full-precision base.*merge_lora"):
        merge_lora(model)
    with pytest.raises(ValueError, match="save_lora"):
        minidpo.save_model(model, Path(tiny_dir) / "never")


# ---------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    # intermediate 128, a multiple of the block as in every real model: bitsandbytes 0.50.2's native
    # CPU dequantization gets rows of 96 (conftest's TINY) wrong past the first block.
    make_hf_mistral(folder, intermediate_size=128, max_shard_size="40KB")  # several shards
    return folder


def test_load_model_quantizes_every_linear_but_the_head(tiny_dir):
    model = minidpo.load_model(tiny_dir, dtype=torch.bfloat16, quantize="nf4")
    full = minidpo.load_model(tiny_dir, dtype=torch.bfloat16)
    quantized = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert quantized == {n for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    for name in quantized:
        w = full.get_submodule(name).weight
        ours = model.get_submodule(name).weight
        packed, _ = _bnb(w, double_quant=True)  # the weight as read in bf16, quantized the same way
        assert torch.equal(ours.packed, packed) and ours.double_quant and ours.dtype == torch.bfloat16
        assert torch.equal(ours.dequantize(), quantize_nf4(w, double_quant=True).dequantize())
    for name, p in model.named_parameters():  # embeddings, norms and the head: the compute dtype
        assert p.dtype == torch.bfloat16 and torch.equal(p, full.get_parameter(name)), name
    before = {n: m.weight.dequantize() for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    model.half()  # casts the dense weights; the 4-bit ones keep their exact statistics
    assert all(torch.equal(model.get_submodule(n).weight.dequantize(), w) for n, w in before.items())
    with pytest.raises(ValueError, match="quantize='int8'"):
        minidpo.load_model(tiny_dir, quantize="int8")


@pytest.fixture(scope="module")
def bnb_dir(tmp_path_factory, tiny_dir):
    """transformers + bitsandbytes quantize the tiny model on CPU and save it (the `*-bnb-4bit` layout);
    -> (transformers' model loaded back from that folder, the folder)."""
    from transformers import BitsAndBytesConfig, MistralForCausalLM

    folder = tmp_path_factory.mktemp("bnb")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MistralForCausalLM.from_pretrained(tiny_dir, quantization_config=config, dtype=torch.float32,
                                           device_map="cpu").save_pretrained(folder)
        hf = MistralForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu").eval()
    for module in hf.modules():  # on AVX512-BF16 CPUs bitsandbytes' eval forward computes in bf16
        if hasattr(module, "support_avx512bf16_for_cpu"):  # whatever the compute dtype: ask for fp32
            module.support_avx512bf16_for_cpu = False
    return hf, folder


def test_bitsandbytes_checkpoint_loads_to_the_same_weights_and_logits(bnb_dir):
    hf, folder = bnb_dir
    stored = load_file(folder / "model.safetensors")
    ours = minidpo.load_model(folder)
    names = [n for n, m in ours.named_modules() if isinstance(m, NF4Linear)]
    assert len(names) == 14 and json.loads((folder / "config.json").read_text())["quantization_config"]
    for name in names:
        prefix = f"{name}.weight."
        state = bnb_functional.QuantState.from_dict(
            {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}, device="cpu")
        assert state.nested
        theirs = bnb_functional.dequantize_4bit(stored[f"{name}.weight"], state)
        assert torch.equal(ours.get_submodule(name).weight.dequantize(), theirs), name
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_bitsandbytes_folder_with_a_dense_module_and_a_missing_statistic(bnb_dir, tiny_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    _, folder = bnb_dir
    shutil.copytree(folder, tmp_path / "m")
    name = "model.layers.0.self_attn.q_proj.weight"  # as bitsandbytes' llm_int8_skip_modules leaves it
    stored, dense = load_file(folder / "model.safetensors"), {name: minidpo.load_model(tiny_dir).get_parameter(name)}
    edited = {k: v for k, v in stored.items() if not k.startswith(name)} | {name: dense[name].detach()}
    save_file(edited, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    model = minidpo.load_model(tmp_path / "m")
    assert type(model.get_submodule(name[:-7])) is torch.nn.Linear and torch.equal(model.get_parameter(name), dense[name])
    assert isinstance(model.get_submodule("model.layers.0.self_attn.k_proj"), NF4Linear)
    del edited["model.layers.1.mlp.up_proj.weight.absmax"]
    save_file(edited, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight.absmax'\] are missing"):
        minidpo.load_model(tmp_path / "m")


# ---------------------------------------------------------------- the Triton kernel


KERNEL_CHILD = textwrap.dedent("""
    import os, sys, torch
    from minidpo.quant import _kernels, quantize_nf4
    k = _kernels()
    if sys.argv[1] == "interpret":
        for shape, seed in (((64, 96), 0), ((33, 17), 1), ((1,), 2), ((3000, 7), 3)):
            w = quantize_nf4(torch.randn(shape, generator=torch.Generator().manual_seed(seed)), double_quant=True)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                got = k.nf4_dequantize(w.packed, w.scales(), w.code, w.numel(), w.block_size, dtype)
                ref = w.dequantize(torch.float32).view(-1)
                # the interpreter converts fp32 to bf16 by truncation (cvt.rn rounds on a GPU)
                want = (ref.view(torch.int32) & ~0xFFFF).view(torch.float32).bfloat16() if dtype == torch.bfloat16 else ref.to(dtype)
                assert torch.equal(got, want), (shape, dtype)
        print("interpreted ok")
    else:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        for fn, signature, constexprs in k.GPU_COMPILE_CASES:
            for cc in (80, 90):
                c = triton.compile(ASTSource(fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", cc, 32))
                assert c.asm["cubin"], (cc, signature)
                print(f"sm_{cc} {signature['out_ptr']} shared {c.metadata.shared}")
""")


@pytest.mark.parametrize("mode", ["interpret", "compile"])
def test_triton_kernel(mode):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("TRITON_INTERPRET", None)
    if mode == "interpret":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", KERNEL_CHILD, mode], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("interpreted ok" in proc.stdout) if mode == "interpret" else proc.stdout.count("sm_") == 6


# ---------------------------------------------------------------- LoRA DPO on an NF4 base


T = __import__("importlib").import_module("minidpo.train")
from test_train import world  # noqa: E402,F401  (the tiny model, tokenizer and pairs of the loop's tests)


def make_config(world, out, **overrides):
    settings = dict(model=str(world / "model"), data=[str(world / "pairs.jsonl")], out=str(out), quantize="nf4",
                    max_length=48, batch_size=4, grad_accum=2, lr=1e-2, warmup_ratio=0.0, max_steps=5,
                    lora_r=4, lora_alpha=8.0, lora_dropout=0.1, ref_cache_dir=str(world / "refcache"))
    return T.TrainConfig(**{**settings, **overrides})


def train_records(out):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):
    config = make_config(world, tmp_path_factory.mktemp("straight") / "out")
    T.train(config)
    return config


def test_dpo_on_nf4_starts_at_ln2_and_learns(straight):
    rows = train_records(straight.out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and abs(rows[0]["rewards/margin"]) < 1e-7
    assert rows[-1]["loss"] < 0.8 * math.log(2) and rows[-1]["rewards/margin"] > 0


KILL_CHILD = textwrap.dedent("""
    import importlib, json, os, signal, sys
    T = importlib.import_module("minidpo.train")
    config = T.TrainConfig(**json.loads(sys.argv[1]))
    real, calls = T.dpo_step, [0]
    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    T.dpo_step = step
    T.train(config)
""")


def test_resume_after_sigkill_gives_the_same_numbers(straight, tmp_path):
    config = dataclasses.replace(straight, out=str(tmp_path / "out"), save_every=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", KILL_CHILD, json.dumps(dataclasses.asdict(config))], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert set(load_file(Path(config.out) / "checkpoints/step-2/trainable.safetensors")) == {
        n for n, p in T.build_models(config, Path(config.model), torch.device("cpu"), torch.float32)[0]
        .named_parameters() if p.requires_grad}  # adapters only
    T.train(dataclasses.replace(config, resume=True))
    drop = lambda r: {k: v for k, v in r.items() if k != "step_time_s"}  # noqa: E731
    assert [drop(r) for r in train_records(config.out)] == [drop(r) for r in train_records(straight.out)]
    a, b = (load_file(Path(o) / "final/adapter_model.safetensors") for o in (config.out, straight.out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_loads_into_peft_on_the_full_precision_base(world, straight):
    from peft import PeftModel
    from transformers import MistralForCausalLM

    final = Path(straight.out) / "final"
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 3]])
    hf = PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(world / "model"), final).eval()
    ours = minidpo.load_lora(minidpo.load_model(world / "model"), final).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
        merged = merge_lora(ours)(ids)  # the merge the refusal on a 4-bit base points to
    torch.testing.assert_close(merged, hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_full_fine_tune_on_nf4_is_refused_and_the_reference_key_differs(world, tmp_path):
    with pytest.raises(ValueError, match="needs LoRA"):
        make_config(world, tmp_path / "x", full=True)
    config = make_config(world, tmp_path / "pre", reference="precomputed", max_steps=1, grad_accum=1)
    T.train(config)
    T.train(dataclasses.replace(config, out=str(tmp_path / "pre16"), quantize=""))
    keys = [json.loads(p.read_text()) for p in (world / "refcache").glob("*/key.json")]
    assert sorted(k.get("quantize", "") for k in keys) == ["", "nf4"]
