"""minidpo.loss against the papers' formulas, written out independently here in float64.

References (each written from the paper, with plain sigmoid and log rather than the log-sigmoid
the module uses):
- DPO, Rafailov et al. 2023, eq. 7: -log σ(β h).
- cDPO, Mitchell 2023 ("A note on DPO with noisy preferences"): labels flipped with probability ε,
  -(1-ε) log σ(βh) - ε log(1 - σ(βh)).
- robust DPO, Chowdhury et al. 2024, the de-biased loss [(1-ε) l(y_w, y_l) - ε l(y_l, y_w)] / (1-2ε)
  with l the DPO loss.
- hinge, SLiC-HF (Zhao et al. 2023) on reference-normalised log-ratios: max(0, 1 - βh).
- IPO, Azar et al. 2023, eq. 17: (h - 1/(2τ))², τ = β.
- SimPO, Meng et al. 2024, eq. 6: -log σ(β Δ - γ), Δ the difference of per-token average log-probs.
- ORPO, Hong et al. 2024, eqs. 4-7: odds(y) = P / (1 - P), L_OR = -log σ(log odds_w - log odds_l), λ = β.
The other loss types are checked against TRL's own code in test_trl_parity.py.
"""
import math

import pytest
import torch

from minidpo.loss import LOSS_TYPES, REFERENCE_FREE, batch_nll, dpo_loss, needs_average, needs_reference, nll_weight

BETAS = [0.01, 0.1, 0.5, 2.0]


def reference_losses(pc, pr, rc, rr, beta, loss_type, eps):
    """Per-pair loss in float64, from the formulas in the papers."""
    h = (pc - rc) - (pr - rr)
    # the model's probability that y_w (p_wl) or y_l (p_lw = 1 - p_wl) is preferred; 1 - p_wl is
    # written as σ(-βh) because the subtraction loses digits in float64 once βh passes ~15
    p_wl, p_lw = torch.sigmoid(beta * h), torch.sigmoid(-beta * h)
    dpo_wl, dpo_lw = -torch.log(p_wl), -torch.log(p_lw)  # DPO loss with labels as given / swapped
    if loss_type == "sigmoid":
        return (1 - eps) * dpo_wl + eps * dpo_lw
    if loss_type == "robust":
        return ((1 - eps) * dpo_wl - eps * dpo_lw) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.clamp(1 - beta * h, min=0)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise AssertionError(loss_type)


def random_logps(b, seed, dtype=torch.float64, scale=1.0):
    """Four [B] tensors like summed sequence log-probs (negative), policy near reference."""
    g = torch.Generator().manual_seed(seed)
    ref = -torch.rand(2, b, generator=g, dtype=torch.float64) * 60 * scale - 1
    policy = ref + torch.randn(2, b, generator=g, dtype=torch.float64) * 3 * scale
    return [t.to(dtype) for t in (policy[0], policy[1], ref[0], ref[1])]


CASES = ([("sigmoid", e) for e in (0.0, 0.1, 0.3, 0.5)] + [("robust", e) for e in (0.0, 0.1, 0.3)]
         + [("hinge", 0.0), ("ipo", 0.0)])


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("loss_type,eps", CASES)
def test_matches_paper_formula_float64_values_and_gradients(beta, loss_type, eps):
    for seed in range(3):
        scale = 0.05 if loss_type == "ipo" else 1.0  # IPO sees per-token averages: small differences
        inputs = [t.requires_grad_() for t in random_logps(37, seed, scale=scale)]
        out = dpo_loss(*inputs, beta=beta, loss_type=loss_type, label_smoothing=eps)
        ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
        want = reference_losses(*ref_inputs, beta, loss_type, eps)

        assert out.loss.dtype == torch.float64 and out.loss.ndim == 0
        torch.testing.assert_close(out.losses, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.loss, want.mean(), rtol=1e-10, atol=1e-12)
        pc, pr, rc, rr = (t.detach() for t in inputs)
        torch.testing.assert_close(out.chosen_rewards, beta * (pc - rc), rtol=0, atol=0)
        torch.testing.assert_close(out.rejected_rewards, beta * (pr - rr), rtol=0, atol=0)

        out.loss.backward()
        want.mean().backward()
        for ours, theirs in zip(inputs[:2], ref_inputs[:2]):  # the policy's gradients
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-12)
        assert inputs[2].grad is None and inputs[3].grad is None  # nothing flows into the reference


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_sigmoid_gradient_matches_closed_form(beta, eps):
    # d/d pc of -(1-ε) log σ(βh) - ε log σ(-βh) = -β[(1-ε) σ(-βh) - ε σ(βh)], over B for the mean.
    pc, pr, rc, rr = random_logps(16, seed=7)
    pc.requires_grad_()
    pr.requires_grad_()
    dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps).loss.backward()
    h = (pc - rc) - (pr - rr)
    expected = -beta * ((1 - eps) * torch.sigmoid(-beta * h) - eps * torch.sigmoid(beta * h)) / 16
    torch.testing.assert_close(pc.grad, expected.detach(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(pr.grad, -expected.detach(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.25), ("robust", 0.25)])
def test_ln2_when_policy_equals_reference(beta, loss_type, eps):
    _, _, rc, rr = random_logps(9, seed=3)
    out = dpo_loss(rc.clone(), rr.clone(), rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-12)
    assert torch.equal(out.chosen_rewards, torch.zeros(9, dtype=torch.float64))
    assert torch.equal(out.rejected_rewards, torch.zeros(9, dtype=torch.float64))
    assert out.accuracy.item() == 0.0


@pytest.mark.parametrize("beta", BETAS)
def test_hinge_and_ipo_at_policy_equals_reference(beta):
    _, _, rc, rr = random_logps(5, seed=4)
    assert dpo_loss(rc, rr, rc, rr, beta=beta, loss_type="hinge").loss.item() == pytest.approx(1.0)
    ipo = dpo_loss(rc, rr, rc, rr, beta=beta, loss_type="ipo").loss.item()
    assert ipo == pytest.approx(1 / (4 * beta ** 2), rel=1e-12)  # (0 - 1/(2β))²


def options(loss_type, b):
    """Keyword arguments every loss type accepts: label smoothing for EXO, an NLL where one is added."""
    extra = {"label_smoothing": 1e-3} if loss_type == "exo_pair" else {}
    if nll_weight(loss_type, **extra):
        extra["chosen_nll"] = torch.rand(b, dtype=torch.float64)
    return extra


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_swapping_chosen_and_rejected_flips_margins(loss_type):
    pc, pr, rc, rr = random_logps(11, seed=5, scale=0.05 if needs_average(loss_type) else 1.0)
    if not needs_reference(loss_type):
        rc = rr = None
    out = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type=loss_type, **options(loss_type, 11))
    swapped = dpo_loss(pr, pc, rr, rc, beta=0.3, loss_type=loss_type, **options(loss_type, 11))
    torch.testing.assert_close(swapped.margins, -out.margins, rtol=0, atol=1e-12)
    torch.testing.assert_close(swapped.chosen_rewards, out.rejected_rewards, rtol=0, atol=0)
    assert out.accuracy.item() + swapped.accuracy.item() == pytest.approx(1.0)  # no exact ties here
    assert out.accuracy.item() == pytest.approx((out.margins > 0).double().mean().item())


def test_sigmoid_swapped_is_the_other_side_of_the_logistic():
    # -log σ(βh) - (-log σ(-βh)) = -βh: the two orders' losses differ by exactly the margin.
    pc, pr, rc, rr = random_logps(13, seed=6)
    out = dpo_loss(pc, pr, rc, rr, beta=0.2)
    swapped = dpo_loss(pr, pc, rr, rc, beta=0.2)
    torch.testing.assert_close(out.losses - swapped.losses, -out.margins, rtol=1e-10, atol=1e-12)


def test_reference_with_grad_gets_none():
    pc, pr, rc, rr = (t.requires_grad_() for t in random_logps(4, seed=8))
    out = dpo_loss(pc, pr, rc, rr)
    out.loss.backward()
    assert rc.grad is None and rr.grad is None
    assert pc.grad is not None and pr.grad is not None
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    inputs = random_logps(64, seed=9, dtype=dtype)
    out = dpo_loss(*inputs, beta=0.1)
    assert out.loss.dtype == torch.float32 and out.chosen_rewards.dtype == torch.float32
    want = reference_losses(*(t.double() for t in inputs), 0.1, "sigmoid", 0.0)
    # the inputs are exactly representable in float64; the only error is float32 arithmetic on
    # log-probs of magnitude ~60 (ulp ~4e-6) amplified by beta < 1
    torch.testing.assert_close(out.losses.double(), want, rtol=1e-5, atol=1e-5)


def test_extreme_margins_stay_finite():
    pc = torch.tensor([0.0, -5000.0], dtype=torch.float32, requires_grad=True)
    pr = torch.tensor([-5000.0, 0.0], dtype=torch.float32)
    zero = torch.zeros(2)
    out = dpo_loss(pc, pr, zero, zero, beta=1.0, label_smoothing=0.1)
    out.loss.backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(pc.grad).all()
    # -0.9 log σ(5000) - 0.1 log σ(-5000) = 0.1 * 5000 (and the mirror image 0.9 * 5000)
    torch.testing.assert_close(out.losses, torch.tensor([500.0, 4500.0]))


def test_needs_average_and_reference():
    assert [t for t in LOSS_TYPES if needs_average(t)] == ["ipo", "sigmoid_norm", "simpo", "orpo"]
    assert [t for t in LOSS_TYPES if not needs_reference(t)] == list(REFERENCE_FREE) == ["simpo", "cpo", "orpo"]
    with pytest.raises(ValueError, match="known: sigmoid, robust, hinge, ipo, sigmoid_norm, exo_pair"):
        needs_average("kto")


def test_simpo_matches_the_paper():
    # eq. 6 with the averages a_w, a_l: -log σ(β (a_w - a_l) - γ), written with plain sigmoid and log
    pc, pr, _, _ = random_logps(8, seed=2, scale=0.05)
    pc.requires_grad_()
    for beta, gamma in ((2.0, 0.5), (0.1, 1.0), (2.5, 0.0)):
        out = dpo_loss(pc, pr, None, None, loss_type="simpo", beta=beta, simpo_gamma=gamma)
        want = -torch.log(torch.sigmoid(beta * (pc - pr) - gamma))
        torch.testing.assert_close(out.losses, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.chosen_rewards, beta * pc.detach(), rtol=0, atol=0)
        assert out.metrics == {}  # plain SimPO adds no NLL (cpo_alpha defaults to 0 for it)


def test_orpo_matches_the_paper_and_stays_finite_near_zero():
    # odds = P / (1 - P) with P = exp(average log-prob); L = NLL - λ log σ(log odds_w - log odds_l)
    pc = torch.tensor([-0.1, -1.5, -4.0, -1e-9], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-0.2, -0.9, -8.0, -50.0], dtype=torch.float64)
    nll = torch.tensor([0.5, 1.0, 2.0, 0.0], dtype=torch.float64)
    out = dpo_loss(pc, pr, None, None, loss_type="orpo", beta=0.25, chosen_nll=nll)
    p_w, p_l = pc.exp(), pr.exp()
    log_odds = torch.log(p_w / (1 - p_w)) - torch.log(p_l / (1 - p_l))
    torch.testing.assert_close(out.losses[:3], (nll - 0.25 * torch.log(torch.sigmoid(log_odds)))[:3],
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.metrics["log_odds_chosen"][:3], log_odds.detach()[:3], rtol=1e-9, atol=1e-12)
    out.loss.backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(pc.grad).all()
    # a near-certain chosen reply (P_w = 1 - 1e-9): log odds_w ~ 20.7, log odds_l ~ -50, log σ(70.7) ~ 0
    assert out.metrics["log_odds_ratio"][3].item() == pytest.approx(0.0, abs=1e-12)
    # a certain one (average log-prob exactly 0, as fp32 rounds a confident reply): finite, no NaN
    pc32 = torch.tensor([0.0, -0.5], requires_grad=True)
    certain = dpo_loss(pc32, torch.tensor([-1.0, -1.0]), None, None, loss_type="orpo", chosen_nll=torch.zeros(2))
    certain.loss.backward()
    assert torch.isfinite(certain.losses).all() and torch.isfinite(pc32.grad).all()


def test_nll_terms_and_their_weights():
    pc, pr, rc, rr = random_logps(6, seed=12)
    nll = torch.rand(6, dtype=torch.float64)
    plain = dpo_loss(pc, pr, rc, rr)
    rpo = dpo_loss(pc, pr, rc, rr, rpo_alpha=0.5, chosen_nll=nll)
    torch.testing.assert_close(rpo.losses, plain.losses + 0.5 * nll, rtol=1e-12, atol=0)
    assert torch.equal(rpo.metrics["nll_loss"], nll) and plain.metrics == {}
    cpo = dpo_loss(pc, pr, None, None, loss_type="cpo", chosen_nll=nll)  # cpo_alpha defaults to 1
    bare = dpo_loss(pc, pr, None, None, loss_type="cpo", cpo_alpha=0.0)
    torch.testing.assert_close(cpo.losses, bare.losses + nll, rtol=1e-12, atol=0)
    cpo_simpo = dpo_loss(pc, pr, None, None, loss_type="simpo", cpo_alpha=0.3, chosen_nll=nll)
    simpo = dpo_loss(pc, pr, None, None, loss_type="simpo")
    torch.testing.assert_close(cpo_simpo.losses, simpo.losses + 0.3 * nll, rtol=1e-12, atol=0)
    assert [nll_weight(t) for t in ("sigmoid", "cpo", "simpo", "orpo")] == [0.0, 1.0, 0.0, 1.0]


def test_batch_nll_is_the_mean_per_chosen_token():
    # chosen replies of 2, 5 and 1 tokens: the NLL per token of the batch is (sum of NLLs) / 8
    sums = torch.tensor([-3.0, -10.0, -0.5], dtype=torch.float64)
    tokens = torch.tensor([2, 5, 1])
    terms = batch_nll(sums, tokens)
    assert terms.mean().item() == pytest.approx(13.5 / 8)
    torch.testing.assert_close(batch_nll(sums / tokens, tokens, average=True), terms)
    # a micro-batch of a bigger step: its terms are scaled by the step's pairs and tokens
    part = batch_nll(sums[:2], tokens[:2], pairs=3, tokens=8)
    assert (part.sum().item() + batch_nll(sums[2:], tokens[2:], pairs=3, tokens=8).sum().item()) / 3 == \
        pytest.approx(13.5 / 8)


def test_bad_arguments_raise():
    pc, pr, rc, rr = random_logps(3, seed=1)
    with pytest.raises(ValueError, match=r"unknown loss_type 'dpo'; known: sigmoid, robust, hinge, ipo"):
        dpo_loss(pc, pr, rc, rr, loss_type="dpo")
    with pytest.raises(ValueError, match="ref_rejected has shape"):
        dpo_loss(pc, pr, rc, rr[:2])
    with pytest.raises(ValueError, match="policy_chosen has shape"):
        dpo_loss(pc[None], pr[None], rc[None], rr[None])
    with pytest.raises(ValueError, match="floating-point"):
        dpo_loss(pc.long(), pr, rc, rr)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.6)
    for loss_type in ("hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "sigmoid_norm"):
        with pytest.raises(ValueError, match="not defined"):
            dpo_loss(pc, pr, rc, rr, loss_type=loss_type, label_smoothing=0.1)
    for loss_type in ("orpo",):
        with pytest.raises(ValueError, match="not defined"):
            dpo_loss(pc, pr, None, None, loss_type=loss_type, label_smoothing=0.1, chosen_nll=pc)
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing > 0"):
        dpo_loss(pc, pr, rc, rr, loss_type="exo_pair")
    with pytest.raises(ValueError, match="uses no reference"):
        dpo_loss(pc, pr, rc, rr, loss_type="simpo")
    with pytest.raises(ValueError, match="ref_chosen must be a floating-point tensor, got NoneType"):
        dpo_loss(pc, pr, None, None, loss_type="sigmoid")
    with pytest.raises(ValueError, match="simpo_gamma is SimPO's margin"):
        dpo_loss(pc, pr, rc, rr, simpo_gamma=1.0)
    with pytest.raises(ValueError, match="cpo_alpha weighs the NLL of cpo and simpo.*use rpo_alpha"):
        dpo_loss(pc, pr, rc, rr, cpo_alpha=1.0)
    with pytest.raises(ValueError, match="rpo_alpha is for the losses with a reference.*cpo_alpha"):
        dpo_loss(pc, pr, None, None, loss_type="cpo", rpo_alpha=1.0)
    with pytest.raises(ValueError, match="pass chosen_nll"):
        dpo_loss(pc, pr, None, None, loss_type="cpo")
    with pytest.raises(ValueError, match="chosen_nll has shape"):
        dpo_loss(pc, pr, None, None, loss_type="orpo", chosen_nll=pc[:2])
    with pytest.raises(ValueError, match="cpo_alpha, rpo_alpha >= 0"):
        dpo_loss(pc, pr, rc, rr, rpo_alpha=-1.0, chosen_nll=pc)
    with pytest.raises(ValueError, match="shape"):
        empty = torch.zeros(0)
        dpo_loss(empty, empty, empty, empty)
