"""Prefix sharing: the packed row prompt + chosen + rejected gives the unshared path's log-probs and
gradients (fp32, 1e-5) for every pair, with sliding windows, padding, long multi-turn prompts and
replies of very different lengths; and training with it gives the same metrics."""
import importlib
import json
import random

import pytest
import torch

from conftest import make_hf_mistral, write_tokenizer_folder
from minidpo import load_model
from minidpo.data import TokenizedPair
from minidpo.lora import apply_lora, lora_layers
from minidpo.prefix import PAD, PackedAttention, packed_attention_mask, packed_collate, packed_logps

T = importlib.import_module("minidpo.train")
VOCAB = 128
PAD_ID = 0
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_pairs(seed: int, shapes) -> list:
    """Pairs of random token ids (never the pad id) with (prompt, chosen, rejected) lengths."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(1, VOCAB) for _ in range(n)]  # noqa: E731
    return [TokenizedPair(ids(n), ids(c), ids(r), "random", i) for i, (n, c, r) in enumerate(shapes)]


# Long multi-turn-sized prompts with short replies, short prompts with long replies, one-token
# replies against 30-token ones, a one-token prompt: one batch, so most rows are padded.
SHAPES = [(40, 3, 30), (6, 25, 1), (1, 7, 9), (23, 12, 12), (3, 1, 2), (17, 30, 4)]


def model_for(tmp_path, window, *, seed=0):
    make_hf_mistral(tmp_path / f"hf{seed}", seed=seed, sliding_window=window, **TINY)
    return load_model(tmp_path / f"hf{seed}")


def randomize_lora(model, targets=("q_proj", "v_proj", "down_proj")):
    apply_lora(model, r=4, alpha=8.0, targets=targets)
    with torch.no_grad():  # B = 0 would make the adapters invisible to the comparison
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.1)
    return model


def logps_and_grads(model, batch, weights, average):
    """-> ([2B] log-probs, {name: grad of sum(weights * logps)}) for the trainable parameters."""
    model.zero_grad(set_to_none=True)
    logps = T.batch_logps(model, batch, average=average)
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_as_unshared(model, pairs, average=False):
    cpu = torch.device("cpu")
    idx = list(range(len(pairs)))
    weights = torch.randn(2 * len(pairs), generator=torch.Generator().manual_seed(1))
    ref, ref_grads = logps_and_grads(model, T.make_batch(pairs, idx, PAD_ID, cpu), weights, average)
    got, grads = logps_and_grads(model, T.make_batch(pairs, idx, PAD_ID, cpu, packed=True), weights, average)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert ref_grads.keys() == grads.keys() and ref_grads
    for name, g in ref_grads.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("window", [None, 5, 16])
@pytest.mark.parametrize("average", [False, True])
def test_lora_logps_and_grads_equal_unshared(tmp_path, window, average):
    model = randomize_lora(model_for(tmp_path, window))
    assert_same_as_unshared(model, random_pairs(window or 0, SHAPES), average)


@pytest.mark.parametrize("window", [None, 4])
def test_full_finetune_logps_and_grads_equal_unshared(tmp_path, window):
    model = model_for(tmp_path, window, seed=1).requires_grad_(True)
    assert_same_as_unshared(model, random_pairs(7, SHAPES))


def test_lora_on_the_head_uses_logits_and_equals_unshared(tmp_path):
    # A LoRA head is not a plain nn.Linear: both layouts take the logits path.
    model = randomize_lora(model_for(tmp_path, 6), targets=("v_proj", "lm_head"))
    assert type(model.lm_head) is not torch.nn.Linear
    assert_same_as_unshared(model, random_pairs(3, SHAPES))


def test_each_pair_alone_equals_unshared(tmp_path):
    # No padding at all, and every pair alone: the batch does not leak between rows either.
    model = randomize_lora(model_for(tmp_path, 5))
    pairs = random_pairs(11, SHAPES)
    together = T.batch_logps(model, T.make_batch(pairs, list(range(6)), PAD_ID, "cpu", packed=True))
    for i, pair in enumerate(pairs):
        alone = T.batch_logps(model, T.make_batch([pair], [0], PAD_ID, "cpu"))
        torch.testing.assert_close(together[[i, i + 6]], alone, rtol=1e-5, atol=1e-5)


def test_layout_targets_and_mask_by_hand():
    pair = TokenizedPair([11, 12], [21, 22, 23], [31], "hand", 0)
    other = TokenizedPair([41], [51], [61, 62], "hand", 1)
    batch = packed_collate([pair, other], PAD_ID)
    assert batch["input_ids"].tolist() == [[11, 12, 21, 22, 23, 31], [41, 51, 61, 62, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 1, 2, 0, 0]]
    x = -100
    # The last prompt token predicts the first token of both replies.
    assert batch["labels_chosen"].tolist() == [[x, 21, 22, 23, x, x], [51, x, x, x, x, x]]
    assert batch["labels_rejected"].tolist() == [[x, 31, x, x, x, x], [61, x, 62, x, x, x]]
    mask = packed_attention_mask(batch["segments"], batch["position_ids"], None)[:, 0].int()
    assert mask[0].tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 1]]
    assert mask[1].tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0],
                                [1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]
    windowed = packed_attention_mask(batch["segments"], batch["position_ids"], 2)[0, 0].int()
    assert windowed[4].tolist() == [0, 0, 0, 1, 1, 0] and windowed[5].tolist() == [0, 1, 0, 0, 0, 1]
    assert (batch["segments"][1, 4:] == PAD).all()


def test_packed_logps_directly_with_a_different_model_window(tmp_path):
    # The mask is built from the model's own window at forward time, so one batch serves any model.
    pairs = random_pairs(5, SHAPES[:3])
    batch = packed_collate(pairs, PAD_ID)
    for window in (3, None):
        model = model_for(tmp_path, window)
        with torch.no_grad():
            got = packed_logps(model, batch)
            ref = T.batch_logps(model, T.make_batch(pairs, [0, 1, 2], PAD_ID, "cpu"))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed,window", [(0, None), (1, None), (2, 3), (3, 20)])
def test_packed_attention_equals_sdpa_with_the_dense_mask(seed, window):
    # The two-piece attention against SDPA with the dense packed mask, on random q, k, v with
    # grouped heads: outputs and the gradients of q, k, v at every real (non-pad) query; with
    # sliding windows that bind (3, 20) the pieces apply them on their slots.
    shapes = SHAPES + [(2, 0, 5), (9, 4, 0)]  # a pair without a chosen, one without a rejected
    batch = packed_collate(random_pairs(seed, shapes), PAD_ID)
    segments, positions = batch["segments"], batch["position_ids"]
    B, width = segments.shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, width, 8, generator=gen, requires_grad=True) for h in (4, 2, 2))
    real = (segments != PAD)[:, None, :, None].float()  # (B, 1, Tp, 1)
    weights = torch.randn(B, 4, width, 8, generator=gen) * real

    def outputs_and_grads(attention):
        y = attention(q, k, v)
        q.grad = k.grad = v.grad = None
        (y * weights).sum().backward()
        return y.detach() * real, [t.grad.clone() for t in (q, k, v)]

    dense_mask = packed_attention_mask(segments, positions, window)
    ref = outputs_and_grads(lambda *x: torch.nn.functional.scaled_dot_product_attention(
        *x, attn_mask=dense_mask, enable_gqa=True))
    got = outputs_and_grads(lambda *x: PackedAttention(segments)(*x, window=window, enable_gqa=True))
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for name, g, r in zip("qkv", got[1], ref[1]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("window", [None, 5])
def test_flex_block_mask_gives_the_same_logps(tmp_path, window):
    # FlexAttention runs eagerly on CPU and has no backward there: forward only (CUDA trains with it).
    model = model_for(tmp_path, window)
    pairs = random_pairs(3, SHAPES)
    batch = T.make_batch(pairs, list(range(len(pairs))), PAD_ID, "cpu", packed=True)
    with torch.no_grad():
        ref = packed_logps(model, batch)
        got = packed_logps(model, {**batch, "attention": "flex"})
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no pairs"):
        packed_collate([], PAD_ID)
    with pytest.raises(ValueError, match="pad_id"):
        packed_collate(random_pairs(0, [(2, 2, 2)]), None)


# ---------------------------------------------------------------------------------------------------
# Through train(): the same metrics with and without prefix sharing.

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix_train")
    make_hf_mistral(root / "model", sliding_window=12, **{**TINY, "vocab_size": 400})
    write_tokenizer_folder(root / "model")
    rows = [{"prompt": f"Question {i}: what comes after {i} in the list, and why is that so?" * (1 + i % 3),
             "chosen": f"{i + 1}." + " Because it counts up." * (i % 4),
             "rejected": "pear, apple, fig, banana." * (1 + i % 2)} for i in range(8)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("overrides", [dict(), dict(reference="precomputed", eval_fraction=0.25),
                                       dict(full=True, grad_accum=2, loss="ipo")])
def test_train_metrics_equal_with_and_without_prefix_sharing(world, tmp_path, overrides):
    runs = []
    for sharing in (False, True):
        out = tmp_path / f"out-{sharing}"
        config = T.TrainConfig(model=str(world / "model"), data=[str(world / "pairs.jsonl")], out=str(out),
                               max_length=96, batch_size=4, lr=1e-2, warmup_ratio=0.0, max_steps=3,
                               lora_r=4, lora_alpha=8.0, lora_dropout=0.0, prefix_sharing=sharing,
                               ref_cache_dir=str(tmp_path / f"cache-{sharing}"), **overrides)
        T.train(config)
        runs.append([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
    assert len(runs[0]) == len(runs[1]) >= 3
    for plain, shared in zip(*runs):
        assert plain.keys() == shared.keys()
        for key, value in plain.items():
            # At step 1 the policy is the reference, so both rewards are 0 up to rounding, and the
            # sign of that rounding (which differs between layouts and CPUs) decides the accuracy.
            if key != "step_time_s" and not (key == "rewards/accuracy" and plain["step"] == 1):
                assert shared[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (plain["step"], key)


def test_flex_attention_is_refused_without_cuda(world, tmp_path):
    config = T.TrainConfig(model=str(world / "model"), data=[str(world / "pairs.jsonl")], out=str(tmp_path / "o"),
                           prefix_attention="flex", device="cpu")
    with pytest.raises(ValueError, match="needs CUDA"):
        T.train(config)
