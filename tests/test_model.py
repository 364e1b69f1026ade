"""minidpo's Mistral against transformers' on the same random weights (fp32, max abs diff <= 1e-4)."""
import json

import pytest
import torch
from conftest import make_hf_mistral

import minidpo
from minidpo.model import MistralConfig

CONFIGS = {
    "gqa": {},
    "plain_heads": dict(num_key_value_heads=4),
    "sliding_window": dict(sliding_window=5),
    "tied": dict(tie_word_embeddings=True),
    "head_dim": dict(head_dim=24, num_attention_heads=4, num_key_value_heads=1),
    "rope_theta": dict(rope_theta=1e6, sliding_window=7),
}


def _tokens(B=3, T=17, V=128, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    hf = make_hf_mistral(tmp_path, **CONFIGS[name])
    model = minidpo.load_model(tmp_path)
    x = _tokens()
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs diff {diff}"


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_mistral(tmp_path, max_shard_size="40KB", sliding_window=4)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = minidpo.load_model(tmp_path)
    x = _tokens()
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() <= 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_changes_nothing(hf_mistral_dir, side):
    hf, folder = hf_mistral_dir
    model = minidpo.load_model(folder)
    real = _tokens(B=1, T=11)
    pad = torch.zeros(1, 5, dtype=torch.long)
    ids = torch.cat([pad, real], 1) if side == "left" else torch.cat([real, pad], 1)
    mask = torch.cat([pad, torch.ones_like(real)], 1) if side == "left" else torch.cat([torch.ones_like(real), pad], 1)
    with torch.no_grad():
        ref = hf(real).logits[0]
        got = model(ids, attention_mask=mask)[0]
    got = got[5:] if side == "left" else got[:11]
    assert (ref - got).abs().max() <= 1e-4
    assert torch.isfinite(model(ids, attention_mask=mask)).all()  # padding rows give no NaN


def test_bf16_loading_matches_transformers_bf16(hf_mistral_dir):
    hf, folder = hf_mistral_dir
    model = minidpo.load_model(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    hf = hf.to(torch.bfloat16)
    x = _tokens()
    with torch.no_grad():
        ref, got = hf(x).logits.float(), model(x).float()
    # Same ops in the same dtype: only summation order may differ.
    assert (ref - got).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=True)])
def test_round_trip_into_transformers(tmp_path, overrides):
    from transformers import MistralForCausalLM

    make_hf_mistral(tmp_path / "a", sliding_window=6, **overrides)
    model = minidpo.load_model(tmp_path / "a")
    minidpo.save_model(model, tmp_path / "b", max_shard_size=30_000)
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    back = MistralForCausalLM.from_pretrained(tmp_path / "b").eval()
    again = minidpo.load_model(tmp_path / "b")
    x = _tokens()
    with torch.no_grad():
        assert (back(x).logits - model(x)).abs().max() <= 1e-4
        assert torch.equal(again(x), model(x))


def test_hidden_states_and_head(hf_mistral_dir):
    _, folder = hf_mistral_dir
    model = minidpo.load_model(folder)
    x = _tokens()
    with torch.no_grad():
        h = model.hidden_states(x)
        assert torch.equal(h @ model.head_weight().T, model(x))


def test_kv_cache_decoding_equals_full_forward(hf_mistral_dir):
    _, folder = hf_mistral_dir
    model = minidpo.load_model(folder)
    ids = _tokens(B=2, T=14)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left-padded second row
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_cache(2, 14)
        steps = [model(ids[:, :8], attention_mask=mask[:, :8], cache=cache)]
        for t in range(8, 14):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
    inc = torch.cat(steps, 1)
    assert (full[0] - inc[0]).abs().max() <= 1e-5
    assert (full[1, 4:] - inc[1, 4:]).abs().max() <= 1e-5


def test_gradient_checkpointing_same_gradients(hf_mistral_dir):
    _, folder = hf_mistral_dir
    grads = []
    for flag in (False, True):
        model = minidpo.load_model(folder).train()
        model.gradient_checkpointing = flag
        model(_tokens()).float().logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_config_from_json_ignores_unknown_keys(tmp_path):
    make_hf_mistral(tmp_path, sliding_window=9, rope_theta=5e5)
    data = json.loads((tmp_path / "config.json").read_text())
    data["some_future_key"] = 3
    (tmp_path / "config.json").write_text(json.dumps(data))
    c = MistralConfig.from_json(tmp_path / "config.json")
    assert (c.sliding_window, c.rope_theta, c.head_dim) == (9, 5e5, 16)


@pytest.mark.parametrize("bad, message", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(sliding_window=0), "sliding_window"),
])
def test_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        MistralConfig(**{"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, **bad})


def test_rope_scaling_is_refused():
    with pytest.raises(ValueError, match="RoPE scaling"):
        MistralConfig.from_dict({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_ready_4d_mask_equals_2d_mask(hf_mistral_dir):
    from minidpo.model import attention_mask_4d

    _, folder = hf_mistral_dir
    model = minidpo.load_model(folder)
    ids = _tokens(B=2, T=12)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = model(ids, attention_mask=mask)
        b = model(ids, attention_mask=attention_mask_4d(mask, 12, model.config.sliding_window), position_ids=positions)
    # The 2-D mask takes the causal path (no mask); real tokens see the same keys either way.
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, attention_mask=attention_mask_4d(mask, 12, None))


def test_flex_attention_block_mask_equals_boolean_mask(hf_mistral_dir):
    """The FlexAttention path gives the SDPA path's outputs for the same mask: packed-like segments,
    a sliding window (6) and GQA. On CPU flex runs eagerly and has no backward: forward only here,
    gradients in the CUDA variant below."""
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        outs, grads = _dense_and_flex(hf_mistral_dir[1], device, backward=device == "cuda")
        assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5), device
        if grads:
            assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4), device


def _dense_and_flex(folder, device, backward):
    from torch.nn.attention.flex_attention import create_block_mask

    model = minidpo.load_model(folder, device=device)
    B, T = 2, 20
    ids = _tokens(B=B, T=T).to(device)
    torch.manual_seed(3)
    segments = torch.randint(0, 3, (B, T)).sort(-1).values.to(device)  # prompt, then two branches
    positions = torch.arange(T, device=device).expand(B, T).contiguous()
    window = model.config.sliding_window

    def allowed(b, h, q, k):
        same = (segments[b, k] == 0) | (segments[b, k] == segments[b, q])
        return same & (k <= q) & (k > q - window)

    q_idx, k_idx = torch.arange(T, device=device)[:, None], torch.arange(T, device=device)[None, :]
    dense = torch.stack([allowed(b, 0, q_idx, k_idx) for b in range(B)])[:, None]  # (B, 1, T, T)
    block = create_block_mask(allowed, B, None, T, T, device=device)
    outs, grads = [], []
    for mask in (dense, block):
        model.zero_grad()
        with torch.set_grad_enabled(backward):
            out = model(ids, attention_mask=mask, position_ids=positions)
        if backward:
            out.square().mean().backward()
            grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
        outs.append(out.detach())
    return outs, grads
