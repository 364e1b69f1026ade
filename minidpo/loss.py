"""Preference losses on per-sequence log-probabilities: DPO, its pairwise variants, SimPO, CPO and ORPO.

Names and formulas are TRL 1.16's (`DPOConfig.loss_type`; `CPOTrainer` for simpo and cpo, `ORPOTrainer`
for orpo), checked against TRL's own code in tests/test_trl_parity.py. With y_w the chosen and y_l the
rejected reply, π the policy and π_ref the reference, per pair (the returned `loss` is their mean)

    c = log π(y_w|x) - log π_ref(y_w|x),   r = log π(y_l|x) - log π_ref(y_l|x),   h = c - r,

β = `beta`, ε = `label_smoothing`, S(z) = -(1-ε) log σ(z) - ε log σ(-z) (the logistic loss, labels smoothed):

    sigmoid       S(βh)                     DPO (Rafailov et al. 2023); cDPO (Mitchell 2023) for ε > 0
    robust        [-(1-ε) log σ(βh) + ε log σ(-βh)] / (1-2ε)   robust DPO (Chowdhury et al. 2024)
    hinge         max(0, 1 - βh)            SLiC's hinge (Zhao et al. 2023) on log-ratios
    ipo           (h - 1/(2β))²             IPO (Azar et al. 2023, eq. 17), τ = β          [averages]
    sigmoid_norm  -log σ(βh)                DPO on per-token averages                        [averages]
    exo_pair      σ(βh)(log σ(βh) - log(1-ε)) + σ(-βh)(log σ(-βh) - log ε)   EXO (Ji et al. 2024), ε > 0
    nca_pair      -log σ(βc) - ½ log σ(-βc) - ½ log σ(-βr)   NCA (Chen et al. 2024)
    bco_pair      -log σ(βc) - log σ(-βr)   BCO's pairwise form, as TRL 1.16 (no running reward mean)
    sppo_hard     (c - 1/(2β))² + (r + 1/(2β))²   SPPO (Wu et al. 2024) with hard labels
    aot           S(β[sort(h + h_ref) - sort(h_ref)]), h_ref = log π_ref(y_w|x) - log π_ref(y_l|x)
                                            AOT (Melnyk et al. 2024), paired
    aot_unpaired  S(β[sort(c) - sort(r)])   both sort within the batch given (a micro-batch, in training)
    apo_zero      1 - σ(βc) + σ(βr)         APO (D'Oosterlinck et al. 2024, eq. 7)
    apo_down      σ(βc) + 1 - σ(βh)         APO eq. 8

Reference-free (`ref_*` are None; c and r are then the policy's log-probs themselves):

    simpo         S(βh - γ), γ = simpo_gamma                SimPO (Meng et al. 2024)            [averages]
    cpo           S(βh)                                     CPO (Xu et al. 2024)
    orpo          -β log σ(o), o = h - log(1-e^c) + log(1-e^r)   ORPO (Hong et al. 2024), β = λ     [averages]

[averages]: pass per-token averaged log-probs (`needs_average`), the others take sums. To these the chosen
reply's NLL is added with weight `nll_weight(...)`: `cpo_alpha` for cpo (default 1) and simpo (default 0;
CPO-SimPO above), 1 for orpo, `rpo_alpha` for the losses with a reference (RPO, Pang et al. 2024). Its
value is TRL's: the mean NLL over all chosen tokens of the batch, which `batch_nll` spreads over the pairs.
The rewards are β c and β r, detached (of the averages where the loss takes averages; TRL's DPOTrainer
logs IPO's and sigmoid_norm's from the sums). No gradient flows into the reference values. sigmoid with
ε > 0 is cDPO as TRL's CPOTrainer computes it (TRL 1.16's DPOTrainer ignores ε for sigmoid).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "simpo", "cpo", "orpo")
REFERENCE_FREE = ("simpo", "cpo", "orpo")
AVERAGED = ("ipo", "sigmoid_norm", "simpo", "orpo")
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo", "cpo")  # the ones using ε
SIMPO_GAMMA = 0.5  # TRL's CPOConfig default


class DPOOutput(NamedTuple):
    """`dpo_loss`'s result; everything but `loss` and `losses` is detached."""
    loss: torch.Tensor              # scalar: mean of `losses`
    chosen_rewards: torch.Tensor    # [B]: beta * c
    rejected_rewards: torch.Tensor  # [B]: beta * r
    losses: torch.Tensor            # [B]: per-pair loss (with grad)
    metrics: dict                   # name -> [B]: `nll_loss` where an NLL is added; orpo `log_odds_ratio`
                                    # (log σ(o)) and `log_odds_chosen` (o), TRL's names; the means are logged

    @property
    def margins(self) -> torch.Tensor:
        """[B]: chosen minus rejected reward (beta * h)."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> torch.Tensor:
        """Scalar: share of pairs whose chosen reward is strictly higher."""
        return (self.chosen_rewards > self.rejected_rewards).float().mean()


def _check_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {', '.join(LOSS_TYPES)}")


def needs_average(loss_type: str) -> bool:
    """Whether `loss_type` takes per-token averaged log-probabilities instead of sums."""
    _check_type(loss_type)
    return loss_type in AVERAGED


def needs_reference(loss_type: str) -> bool:
    """Whether `loss_type` compares with a reference model (False for simpo, cpo, orpo)."""
    _check_type(loss_type)
    return loss_type not in REFERENCE_FREE


def nll_weight(loss_type: str, *, beta: float = 0.1, label_smoothing: float = 0.0,
               simpo_gamma: float = SIMPO_GAMMA, cpo_alpha: Optional[float] = None,
               rpo_alpha: float = 0.0) -> float:
    """Check a loss's options (ValueError for one TRL rejects or that means nothing for `loss_type`)
    and return the weight of the chosen reply's NLL in its loss (0: none)."""
    _check_type(loss_type)
    finite = all(math.isfinite(v) for v in (beta, label_smoothing, simpo_gamma, rpo_alpha, cpo_alpha or 0.0))
    if not finite or beta <= 0 or rpo_alpha < 0 or (cpo_alpha or 0.0) < 0:
        raise ValueError(f"beta must be positive and cpo_alpha, rpo_alpha >= 0, all finite; got beta={beta}, "
                         f"cpo_alpha={cpo_alpha}, rpo_alpha={rpo_alpha}, simpo_gamma={simpo_gamma}")
    eps, name = label_smoothing, f"loss_type {loss_type!r}"
    if eps and loss_type not in SMOOTHED:
        raise ValueError(f"label_smoothing is not defined for {name} (only for {', '.join(SMOOTHED)}); set it to 0")
    if not 0 <= eps <= 0.5 or (loss_type == "robust" and eps == 0.5):  # robust divides by 1 - 2ε
        raise ValueError(f"label_smoothing {eps} out of range for {name}: [0, 0.5] ([0, 0.5) for robust)")
    if loss_type == "exo_pair" and eps == 0:  # log ε
        raise ValueError("exo_pair needs label_smoothing > 0 (the EXO paper suggests 1e-3)")
    if simpo_gamma != SIMPO_GAMMA and loss_type != "simpo":
        raise ValueError(f"simpo_gamma is SimPO's margin; it means nothing for {name}")
    if cpo_alpha and loss_type not in ("cpo", "simpo"):
        raise ValueError(f"cpo_alpha weighs the NLL of cpo and simpo; it means nothing for {name}"
                         + (" (use rpo_alpha)" if loss_type not in REFERENCE_FREE else ""))
    if rpo_alpha and loss_type in REFERENCE_FREE:
        raise ValueError(f"rpo_alpha is for the losses with a reference; {name} has its own NLL weight"
                         + (" (cpo_alpha)" if loss_type != "orpo" else ""))
    if loss_type == "orpo":
        return 1.0
    if loss_type in ("cpo", "simpo"):
        return float(loss_type == "cpo") if cpo_alpha is None else cpo_alpha
    return rpo_alpha


def batch_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor, *, average: bool = False,
              pairs=None, tokens=None) -> torch.Tensor:
    """[B] per-pair terms for `dpo_loss(chosen_nll=...)`: their mean over `pairs` pairs is the NLL per
    chosen token over `tokens` tokens, TRL's `nll_loss` (the cross-entropy over every chosen token of the
    batch). `chosen_logps` [B]: summed (or, with `average`, per-token mean) log-probs of the chosen
    replies; `chosen_tokens` [B]: their token counts. `pairs` and `tokens` (numbers or 0-d tensors) default
    to this batch's B and `chosen_tokens.sum()`; a training step passes its own, so its micro-batches add
    up to the step's token mean."""
    counts = chosen_tokens.to(chosen_logps.dtype)
    sums = chosen_logps * counts if average else chosen_logps
    pairs = chosen_logps.shape[0] if pairs is None else pairs
    return -sums * (pairs / (counts.sum() if tokens is None else tokens))


def _check_tensors(tensors: dict) -> None:
    shape = tensors["policy_chosen"].shape
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {type(t).__name__}"
                             + (f" {t.dtype}" if isinstance(t, torch.Tensor) else ""))
        if t.ndim != 1 or t.shape != shape or t.numel() == 0:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; all must be the same [B], B >= 1")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0 without cancellation (Mächler 2012: switch formulas at -ln 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _pair_losses(loss_type: str, c, r, ref_h, beta: float, eps: float, gamma: float) -> tuple:
    """-> ([B] losses, metrics) from the log-ratios (policy log-probs when reference-free) c and r."""
    h = c - r

    def smoothed(z):  # S(z)
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)

    if loss_type in ("sigmoid", "cpo"):
        return smoothed(beta * h), {}
    if loss_type == "simpo":
        return smoothed(beta * h - gamma), {}
    if loss_type == "orpo":
        # a reply of probability 1 (an average log-prob of 0, which fp32 rounding produces) has infinite
        # odds and a NaN gradient; capped at -eps (TRL does not cap) it has a finite, zero one
        top = -torch.finfo(c.dtype).eps
        log_odds = h - (_log1mexp(c.clamp(max=top)) - _log1mexp(r.clamp(max=top)))
        ratio = F.logsigmoid(log_odds)
        return -beta * ratio, {"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps), {}
    if loss_type == "aot":  # sorted policy log-ratios against sorted reference log-ratios
        return smoothed(beta * (torch.sort(h + ref_h).values - torch.sort(ref_h).values)), {}
    if loss_type == "aot_unpaired":
        return smoothed(beta * (torch.sort(c).values - torch.sort(r).values)), {}
    z, zc, zr = beta * h, beta * c, beta * r
    losses = {
        "hinge": lambda: torch.relu(1 - z),
        "ipo": lambda: (h - 1 / (2 * beta)) ** 2,
        "sigmoid_norm": lambda: -F.logsigmoid(z),
        "exo_pair": lambda: (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                             + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))),
        "nca_pair": lambda: -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr),
        "bco_pair": lambda: -F.logsigmoid(zc) - F.logsigmoid(-zr),
        "sppo_hard": lambda: (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2,
        "apo_zero": lambda: 1 - torch.sigmoid(zc) + torch.sigmoid(zr),
        "apo_down": lambda: torch.sigmoid(zc) + 1 - torch.sigmoid(z),
    }
    return losses[loss_type](), {}


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: Optional[torch.Tensor], ref_rejected: Optional[torch.Tensor], *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, simpo_gamma: float = SIMPO_GAMMA,
             cpo_alpha: Optional[float] = None, rpo_alpha: float = 0.0,
             chosen_nll: Optional[torch.Tensor] = None) -> DPOOutput:
    """Preference loss of B pairs from `[B]` float tensors of sequence log-probabilities.

    `policy_*` and `ref_*`: summed log-probs, or per-token averages for ipo, sigmoid_norm, simpo and
    orpo (`needs_average`); `ref_*` are None for the reference-free simpo, cpo and orpo. `chosen_nll`
    [B] (see `batch_nll`) is needed where an NLL is added: cpo (`cpo_alpha`, default 1), simpo with
    `cpo_alpha` > 0, orpo, and `rpo_alpha` > 0. Computes in float32 (float64 inputs stay float64).
    See the module docstring for the formulas. Returns `DPOOutput`.
    """
    weight = nll_weight(loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
                        cpo_alpha=cpo_alpha, rpo_alpha=rpo_alpha)
    tensors = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected}
    free = loss_type in REFERENCE_FREE
    if free and (ref_chosen is not None or ref_rejected is not None):
        raise ValueError(f"loss_type {loss_type!r} uses no reference: pass None for ref_chosen and ref_rejected")
    if not free:
        tensors.update(ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    if weight:
        if chosen_nll is None:
            raise ValueError(f"loss_type {loss_type!r} adds the chosen NLL (weight {weight}): pass chosen_nll "
                             f"(minidpo.loss.batch_nll)")
        tensors["chosen_nll"] = chosen_nll
    _check_tensors(tensors)
    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)
    c, r, ref_h = policy_chosen.to(dtype), policy_rejected.to(dtype), None
    if not free:
        ref_c, ref_r = ref_chosen.detach().to(dtype), ref_rejected.detach().to(dtype)
        c, r, ref_h = c - ref_c, r - ref_r, ref_c - ref_r
    losses, metrics = _pair_losses(loss_type, c, r, ref_h, beta, label_smoothing, simpo_gamma)
    if weight:
        losses = losses + weight * chosen_nll.to(dtype)
        metrics["nll_loss"] = chosen_nll.detach().to(dtype)
    return DPOOutput(losses.mean(), beta * c.detach(), beta * r.detach(), losses, metrics)
