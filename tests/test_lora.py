"""LoRA against PEFT on the same random transformers Mistral and the same adapter files.

Parity is checked both ways (minidpo -> PEFT, PEFT -> minidpo) on fp32 logits (max abs diff <= 1e-4),
with random non-zero B so that a wrong scale, transpose or key name cannot pass.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_mistral
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import minidpo
from minidpo.lora import (DEFAULT_TARGETS, LoRALinear, apply_lora, count_trainable, load_lora,
                          lora_disabled, lora_layers, lora_parameters, merge_lora, save_lora)
from minidpo.model import Mistral, MistralConfig

peft = pytest.importorskip("peft")  # a test requirement (requirements-test.txt); never skipped there
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

ALL = DEFAULT_TARGETS + ("lm_head",)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random transformers Mistral saved as an HF folder; make_hf_mistral() rebuilds its weights."""
    folder = tmp_path_factory.mktemp("base")
    make_hf_mistral(folder)
    return folder


def _tokens(B=2, T=9, V=128, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _randomize(params, seed=3, std=0.1):
    """Random A and B, so the adapter changes the output and a wrong mapping shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _adapted(base_dir, targets=ALL, r=4, alpha=8, **kw):
    model = minidpo.load_model(base_dir)
    apply_lora(model, r=r, alpha=alpha, targets=targets, **kw)
    _randomize(lora_parameters(model))
    return model


def _peft_lora_names(pm):
    """Module names (in the transformers model) that PEFT put a LoRA layer on."""
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, LoraLayer)}


# ---------------------------------------------------------------- parity with PEFT


@pytest.mark.parametrize("targets", [DEFAULT_TARGETS, ALL, ("q_proj", "v_proj")])
def test_minidpo_adapter_gives_same_logits_in_peft(base_dir, tmp_path, targets):
    model = minidpo.load_model(base_dir)
    x = _tokens()
    with torch.no_grad():
        base = model(x)
    apply_lora(model, r=4, alpha=8, targets=targets)
    _randomize(lora_parameters(model))
    save_lora(model, tmp_path / "adapter")
    pm = PeftModel.from_pretrained(make_hf_mistral(), tmp_path / "adapter").eval()
    assert _peft_lora_names(pm) == set(lora_layers(model))
    with torch.no_grad():
        ours, theirs = model(x), pm(x).logits
    assert (ours - base).abs().max() > 0.05  # the adapter matters, so the comparison below can fail
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("spec, prepared", [
    (list(ALL), False),  # PEFT also stores lm_head.base_layer.weight here
    (list(DEFAULT_TARGETS), True),  # into a model that already has matching LoRA layers
    (r".*\.self_attn\.(q_proj|v_proj)", False),  # a regex, matched in full as PEFT does
    ("all-linear", False),  # PEFT's shorthand: every Linear but the output layer
])
def test_peft_adapter_gives_same_logits_in_minidpo(base_dir, tmp_path, spec, prepared):
    hf = make_hf_mistral()
    torch.manual_seed(0)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=spec,
                                       task_type="CAUSAL_LM")).eval()
    _randomize([p for n, p in pm.named_parameters() if "lora_" in n], seed=7)
    pm.save_pretrained(tmp_path / "adapter")
    model = minidpo.load_model(base_dir)
    with torch.no_grad():
        base = model(_tokens())
    if prepared:
        apply_lora(model, r=4, alpha=16, targets=DEFAULT_TARGETS)
    assert load_lora(model, tmp_path / "adapter") is model
    assert set(lora_layers(model)) == _peft_lora_names(pm)
    if not prepared:  # applied from the config, dropout included
        assert all(layer.dropout.p == 0.1 for layer in lora_layers(model).values())
    with torch.no_grad():
        ours, theirs = model.eval()(_tokens()), pm(_tokens()).logits
    assert (ours - base).abs().max() > 0.05
    assert (ours - theirs).abs().max() <= 1e-4


def test_lm_head_base_layer_in_file_is_loaded_as_peft_does(base_dir, tmp_path):
    pm = get_peft_model(make_hf_mistral(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                      task_type="CAUSAL_LM"))
    _randomize([p for n, p in pm.named_parameters() if "lora_" in n])
    pm.save_pretrained(tmp_path / "adapter")
    key = "base_model.model.lm_head.base_layer.weight"
    _edit_tensors(tmp_path / "adapter", lambda t: t[key].mul_(1.5))  # PEFT copies it into the base
    theirs = PeftModel.from_pretrained(make_hf_mistral(), tmp_path / "adapter").eval()
    model = load_lora(minidpo.load_model(base_dir, dtype=torch.float64), tmp_path / "adapter")
    assert model.lm_head.weight.dtype == torch.float64 and model.lm_head.lora_A.weight.dtype == torch.float32
    x = _tokens()
    with torch.no_grad():
        assert (model(x).float() - theirs(x).logits).abs().max() <= 1e-4


def test_gradients_match_peft(base_dir, tmp_path):
    model = _adapted(base_dir, targets=DEFAULT_TARGETS)
    save_lora(model, tmp_path / "adapter")
    pm = PeftModel.from_pretrained(make_hf_mistral(), tmp_path / "adapter", is_trainable=True).eval()
    x = _tokens()
    model(x).logsumexp(-1).mean().backward()
    pm(x).logits.logsumexp(-1).mean().backward()
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
              for n, p in pm.named_parameters() if "lora_" in n}
    ours = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert set(ours) == set(theirs)
    for name, g in ours.items():
        assert (g - theirs[name]).abs().max() <= 1e-5 + 1e-4 * theirs[name].abs().max(), name


def test_saved_files_have_peft_layout(base_dir, tmp_path):
    hf = make_hf_mistral()
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGETS),
                                       task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "peft")
    model = _adapted(base_dir, targets=DEFAULT_TARGETS)
    save_lora(model, tmp_path / "ours", base_model_name_or_path="org/base")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]
    theirs, ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(v.dtype == torch.float32 for v in ours.values())
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False
    assert config["base_model_name_or_path"] == "org/base"
    loaded = LoraConfig.from_pretrained(tmp_path / "ours")  # PEFT's own parser
    assert (loaded.r, loaded.lora_alpha, loaded.lora_dropout) == (4, 8, 0.0)
    assert set(loaded.target_modules) == set(DEFAULT_TARGETS)


def test_init_is_peft_init(base_dir):
    hf = make_hf_mistral()
    torch.manual_seed(5)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=list(ALL), task_type="CAUSAL_LM"))
    model = minidpo.load_model(base_dir)
    torch.manual_seed(5)
    apply_lora(model, r=4, alpha=8, targets=ALL)
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p
              for n, p in pm.named_parameters() if "lora_" in n}
    for name, p in model.named_parameters():
        if "lora_A" in name:
            assert torch.equal(p, theirs[name]), name  # same RNG draws in the same order
            assert p.abs().max() <= p.shape[1] ** -0.5  # Kaiming-uniform with a=sqrt(5): U(+-1/sqrt(in))
        elif "lora_B" in name:
            assert not p.any(), name


# ---------------------------------------------------------------- invariants


def test_fresh_adapter_is_the_base(base_dir):
    model = minidpo.load_model(base_dir)
    x = _tokens()
    with torch.no_grad():
        base = model(x)
        apply_lora(model, r=4, alpha=8, targets=ALL)
        assert torch.equal(model(x), base)  # B = 0


def test_lora_disabled_is_the_base_exactly(base_dir):
    model = minidpo.load_model(base_dir)
    x = _tokens()
    with torch.no_grad():
        base = model(x)
        apply_lora(model, r=4, alpha=8, targets=ALL)
        _randomize(lora_parameters(model))
        adapted = model(x)
        with lora_disabled(model) as same:
            assert same is model
            assert torch.equal(model(x), base)
            with lora_disabled(model):  # nesting keeps the outer state on exit
                pass
            assert torch.equal(model(x), base)
        assert torch.equal(model(x), adapted)
        with pytest.raises(KeyError):
            with lora_disabled(model):
                raise KeyError("inside")
        assert not any(layer.disabled for layer in lora_layers(model).values())
        assert torch.equal(model(x), adapted)


def test_lora_disabled_refuses_merged_and_plain_models(base_dir):
    model = _adapted(base_dir)
    model.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(ValueError, match=r"merged.*q_proj.*unmerge"):
        with lora_disabled(model):
            pass
    with pytest.raises(ValueError, match="no LoRA layers"):
        with lora_disabled(minidpo.load_model(base_dir)):
            pass


def test_merge_lora_keeps_logits_and_leaves_plain_linears(base_dir, tmp_path):
    from transformers import MistralForCausalLM

    model = _adapted(base_dir)
    keys = set(minidpo.load_model(base_dir).state_dict())
    x = _tokens()
    with torch.no_grad():
        adapted = model(x)
        assert merge_lora(model) is model
        merged = model(x)
    assert (merged - adapted).abs().max() <= 1e-5
    assert not lora_layers(model) and set(model.state_dict()) == keys
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(ALL))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(model)  # merging twice is merging once
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    minidpo.save_model(model, tmp_path / "merged")
    back = MistralForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (back(x).logits - adapted).abs().max() <= 1e-4


def test_merge_matches_peft_merge_and_unload(base_dir, tmp_path):
    model = _adapted(base_dir)
    save_lora(model, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(make_hf_mistral(), tmp_path / "adapter").merge_and_unload()
    theirs = theirs.state_dict()
    for name, w in merge_lora(model).state_dict().items():
        assert (w - theirs[name]).abs().max() <= 1e-6, name


def _layer(dtype=torch.float32, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(40, 24, bias=False, dtype=dtype), r=4, alpha=8, dropout=dropout)
    _randomize([layer.lora_A.weight, layer.lora_B.weight], seed=seed + 1)
    return layer


def test_layer_merge_unmerge_are_idempotent():
    layer = _layer()
    x = torch.randn(3, 5, 40)
    w0, y0 = layer.weight.detach().clone(), layer(x).detach()
    with torch.no_grad():
        expected = w0 + 2.0 * layer.lora_B.weight.double() @ layer.lora_A.weight.double()  # scale = 8 / 4
    layer.merge()
    w1 = layer.weight.detach().clone()
    assert (w1.double() - expected).abs().max() <= 1e-6
    layer.merge()
    assert torch.equal(layer.weight, w1)
    assert (layer(x) - y0).abs().max() <= 1e-5
    layer.unmerge()
    layer.unmerge()
    assert (layer.weight - w0).abs().max() <= 1e-6 and not layer.merged
    assert (layer(x) - y0).abs().max() <= 1e-5
    layer.merge()
    layer.disabled = True
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x)


def test_gradients_reach_only_lora_parameters(base_dir):
    model = _adapted(base_dir)
    model(_tokens()).logsumexp(-1).mean().backward()
    lora_ids = {id(p) for p in lora_parameters(model)}
    assert lora_ids == {id(p) for p in model.parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if id(p) in lora_ids:
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, name
    assert count_trainable(model) == sum(p.numel() for p in lora_parameters(model))


def test_bf16_base_with_fp32_adapters(base_dir, tmp_path):
    model = minidpo.load_model(base_dir, dtype=torch.bfloat16)
    apply_lora(model, r=4, alpha=8, targets=ALL)
    _randomize(lora_parameters(model))
    lora_ids = {id(p) for p in lora_parameters(model)}
    assert all(p.dtype == (torch.float32 if id(p) in lora_ids else torch.bfloat16) for p in model.parameters())
    save_lora(model, tmp_path / "adapter")
    hf = make_hf_mistral().to(torch.bfloat16)
    pm = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()  # keeps adapters in fp32 too
    x = _tokens()
    with torch.no_grad():
        got, ref = model(x), pm(x).logits
    assert got.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "lora_" not in n)
    # Same ops in the same dtypes: only summation order and rounding may differ (as test_model's bf16 test).
    assert (ref.float() - got.float()).abs().max() <= 2e-2 * ref.float().abs().max()
    merge_lora(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


class _RecordOps(TorchDispatchMode):
    """Records (dtype, shape) of every tensor an op returns, forward and backward."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.outputs += [(t.dtype, tuple(t.shape)) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out


def test_bf16_layer_makes_no_fp32_copy_of_the_weight():
    layer = _layer(dtype=torch.bfloat16)
    x = torch.randn(3, 5, 40, dtype=torch.bfloat16, requires_grad=True)
    with _RecordOps() as rec:
        y = layer(x)
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    weight_shaped = [(d, s) for d, s in rec.outputs if sorted(s) == [24, 40] and d != torch.bfloat16]
    assert not weight_shaped, weight_shaped
    assert layer.lora_A.weight.grad.dtype == torch.float32


def test_dropout_only_in_train_mode_and_only_on_the_adapter_input():
    layer = _layer(dropout=0.5)
    x = torch.randn(6, 40)
    with torch.no_grad():
        base = F.linear(x, layer.weight)
        clean = base + layer.lora_B(layer.lora_A(x) * layer.scale)
        layer.eval()
        assert torch.equal(layer(x), layer(x))
        assert (layer(x) - clean).abs().max() <= 1e-6
        layer.train()
        torch.manual_seed(11)
        noisy = layer(x)
        torch.manual_seed(11)
        dropped = F.dropout(x, 0.5, training=True)
        assert (noisy - (base + layer.lora_B(layer.lora_A(dropped) * layer.scale))).abs().max() <= 1e-6
        assert (noisy - clean).abs().max() > 1e-2
        layer.disabled = True
        assert torch.equal(layer(x), base)  # the base path never sees dropout


def test_mistral_7b_count_on_meta():
    from transformers import MistralConfig as HFConfig, MistralForCausalLM

    with torch.device("meta"):
        model = Mistral(MistralConfig())  # defaults are Mistral-7B's shapes
    apply_lora(model, r=16, alpha=32)
    c, r = model.config, 16
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    H, I = c.hidden_size, c.intermediate_size
    per_layer = r * ((H + q) + 2 * (H + kv) + (q + H) + 2 * (H + I) + (I + H))  # r * (in + out) per Linear
    assert count_trainable(model) == c.num_hidden_layers * per_layer == 41_943_040  # the figure
    with torch.device("meta"):  # and PEFT's count on transformers' Mistral-7B shapes
        pm = get_peft_model(MistralForCausalLM(HFConfig()), LoraConfig(
            r=16, lora_alpha=32, target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM"))
    assert pm.get_nb_trainable_parameters()[0] == 41_943_040


def test_apply_lora_checks_targets_and_hyperparameters(base_dir):
    model = minidpo.load_model(base_dir)
    with pytest.raises(ValueError, match="qkv_proj") as e:
        apply_lora(model, r=4, alpha=8, targets=("q_proj", "qkv_proj"))
    assert all(n in str(e.value) for n in ALL)  # the names that exist are listed
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())
    for bad in (dict(r=0, alpha=8), dict(r=4, alpha=0), dict(r=4, alpha=8, dropout=1.0)):
        with pytest.raises(ValueError):
            apply_lora(model, **bad)
    apply_lora(model, r=4, alpha=8, targets="lm_head")
    assert list(lora_layers(model)) == ["lm_head"]
    assert count_trainable(model) == 4 * (64 + 128)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, r=4, alpha=8)


def test_deterministic_init():
    def build():
        torch.manual_seed(3)
        return apply_lora(Mistral(MistralConfig(**SMALL)), r=4, alpha=8, targets=ALL)

    a, b = build(), build()
    assert all(torch.equal(p, q) for p, q in zip(lora_parameters(a), lora_parameters(b)))


SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, sliding_window=None)


def test_tied_head_stays_tied_and_refuses_merge(tmp_path):
    model = Mistral(MistralConfig(**SMALL, tie_word_embeddings=True)).init_weights(seed=0)
    apply_lora(model, r=2, alpha=4, targets=ALL)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _randomize(lora_parameters(model))
    save_lora(model, tmp_path / "adapter")
    again = load_lora(Mistral(MistralConfig(**SMALL, tie_word_embeddings=True)).init_weights(seed=0),
                      tmp_path / "adapter")
    x = _tokens(V=96)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    with pytest.raises(ValueError, match="lm_head.*shared"):
        merge_lora(model)


def test_save_load_round_trip_is_exact(base_dir, tmp_path):
    model = _adapted(base_dir, dropout=0.2)
    save_lora(model, tmp_path / "adapter")
    again = load_lora(minidpo.load_model(base_dir), tmp_path / "adapter")
    assert {n: l.r for n, l in lora_layers(again).items()} == {n: l.r for n, l in lora_layers(model).items()}
    assert all(layer.dropout.p == 0.2 for layer in lora_layers(again).values())
    x = _tokens()
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


# ---------------------------------------------------------------- bad adapter folders

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def _edit_config(folder, **changes):
    file = folder / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _edit_tensors(folder, fn):
    file = folder / "adapter_model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file)


BAD = {
    "wrong r in config": (lambda f: _edit_config(f, r=8), ValueError, r"misshapen.*" + Q_A.replace(".", r"\.")),
    "unknown target": (lambda f: _edit_config(f, target_modules=["q_proj", "fc1"]), ValueError, "fc1"),
    "untargeted tensor": (lambda f: _edit_config(f, target_modules=["q_proj"]), ValueError,
                          r"unexpected.*layers\.0\.self_attn\.k_proj\.lora_A\.weight"),
    "wrong shape": (lambda f: _edit_tensors(f, lambda t: t.update({Q_A: torch.zeros(4, 63)})), ValueError,
                    r"q_proj\.lora_A\.weight: file \(4, 63\)"),
    "missing tensor": (lambda f: _edit_tensors(f, lambda t: t.pop(Q_A)), ValueError,
                       r"missing.*" + Q_A.replace(".", r"\.")),
    "unprefixed key": (lambda f: _edit_tensors(f, lambda t: t.update({"q_proj.lora_A.weight": t.pop(Q_A)})),
                       ValueError, r"unexpected \['q_proj\.lora_A\.weight'\]"),
    "missing weights": (lambda f: (f / "adapter_model.safetensors").unlink(), FileNotFoundError,
                        "adapter_model.safetensors"),
    "missing config": (lambda f: (f / "adapter_config.json").unlink(), FileNotFoundError,
                       "adapter_config.json"),
    "dora": (lambda f: _edit_config(f, use_dora=True), ValueError, "use_dora"),
    "not json": (lambda f: (f / "adapter_config.json").write_text("{"), ValueError, "adapter_config.json"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_adapter_folder_is_named(base_dir, tmp_path, case):
    edit, error, message = BAD[case]
    save_lora(_adapted(base_dir, targets=DEFAULT_TARGETS), tmp_path / "adapter")
    edit(tmp_path / "adapter")
    model = minidpo.load_model(base_dir)
    with pytest.raises(error, match=message):
        load_lora(model, tmp_path / "adapter")
    assert not lora_layers(model)  # all or nothing: a refused adapter leaves the model as it was


def test_adapter_not_fitting_existing_lora_layers(base_dir, tmp_path):
    save_lora(_adapted(base_dir, targets=DEFAULT_TARGETS, r=8), tmp_path / "r8")
    model = apply_lora(minidpo.load_model(base_dir), r=4, alpha=8)
    with pytest.raises(ValueError, match=r"r=8.*r=4"):
        load_lora(model, tmp_path / "r8")
    save_lora(_adapted(base_dir, targets=("q_proj",), r=4), tmp_path / "q")
    with pytest.raises(ValueError, match=r"differ.*only in the model \[.*'model\.layers\.0\.self_attn\.k_proj'"):
        load_lora(model, tmp_path / "q")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_lora(model, tmp_path / "nowhere")
