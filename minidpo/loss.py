"""Preference losses on per-sequence log-probabilities: DPO and three variants.

With `log π(y|x)` the policy's and `log π_ref(y|x)` the reference's log-probability of a reply,
y_w the chosen and y_l the rejected one, every loss is a function of the log-ratio difference

    h = [log π(y_w|x) - log π_ref(y_w|x)] - [log π(y_l|x) - log π_ref(y_l|x)]

and, per pair (the returned `loss` is the mean over pairs), with β = `beta`, ε = `label_smoothing`:

    sigmoid  -(1-ε) log σ(βh) - ε log σ(-βh)         DPO (Rafailov et al. 2023, eq. 7) at ε = 0;
                                                     conservative DPO (cDPO, Mitchell 2023) for ε > 0
    robust   [-(1-ε) log σ(βh) + ε log σ(-βh)] / (1-2ε)   robust DPO (Chowdhury et al. 2024): an
                                                     unbiased loss when a share ε of labels is flipped
    hinge    max(0, 1 - βh)                          SLiC's calibration hinge (Zhao et al. 2023) on
                                                     reference-normalised log-ratios, margin 1/β
    ipo      (h - 1/(2β))²                           IPO (Azar et al. 2023, eq. 17) with τ = β

IPO is meant for per-token averaged log-probabilities (`needs_average("ipo")` is True): pass
`sequence_logprobs(..., average=True)` values for it; the others take summed log-probabilities.
The implicit rewards are `β (log π - log π_ref)` per reply, detached. No gradient flows into the
reference values, whether or not they require grad.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


class DPOOutput(NamedTuple):
    """`dpo_loss`'s result; the reward tensors are detached."""
    loss: torch.Tensor              # scalar: mean of `losses`
    chosen_rewards: torch.Tensor    # [B]: beta * (policy_chosen - ref_chosen)
    rejected_rewards: torch.Tensor  # [B]: beta * (policy_rejected - ref_rejected)
    losses: torch.Tensor            # [B]: per-pair loss (with grad)

    @property
    def margins(self) -> torch.Tensor:
        """[B]: chosen minus rejected reward (beta * h)."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> torch.Tensor:
        """Scalar: share of pairs whose chosen reward is strictly higher."""
        return (self.chosen_rewards > self.rejected_rewards).float().mean()


def needs_average(loss_type: str) -> bool:
    """Whether `loss_type` expects per-token averaged log-probabilities (IPO) instead of sums."""
    _check_type(loss_type)
    return loss_type == "ipo"


def _check_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {', '.join(LOSS_TYPES)}")


def _check_args(tensors: dict[str, torch.Tensor], beta: float, loss_type: str,
                label_smoothing: float) -> None:
    _check_type(loss_type)
    shape = tensors["policy_chosen"].shape
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {type(t).__name__}"
                             + (f" {t.dtype}" if isinstance(t, torch.Tensor) else ""))
        if t.ndim != 1 or t.shape != shape or t.numel() == 0:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; all four must be the same [B], B >= 1")
    if not beta > 0 or beta == float("inf"):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    if loss_type in ("hinge", "ipo"):
        if label_smoothing != 0:
            raise ValueError(f"label_smoothing is not defined for loss_type {loss_type!r}; set it to 0")
    elif not 0.0 <= label_smoothing <= 0.5 or (loss_type == "robust" and label_smoothing == 0.5):
        # robust divides by 1 - 2ε
        raise ValueError(f"label_smoothing {label_smoothing} out of range for {loss_type!r}: "
                         f"[0, 0.5] for sigmoid, [0, 0.5) for robust")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> DPOOutput:
    """Preference loss of B pairs from four `[B]` float tensors of sequence log-probabilities.

    Computes in float32 (float64 inputs stay float64). See the module docstring for the formulas.
    Returns `DPOOutput(loss, chosen_rewards, rejected_rewards, losses)`.
    """
    _check_args({"policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
                 "ref_chosen": ref_chosen, "ref_rejected": ref_rejected}, beta, loss_type, label_smoothing)
    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)
    chosen_ratio = policy_chosen.to(dtype) - ref_chosen.detach().to(dtype)
    rejected_ratio = policy_rejected.to(dtype) - ref_rejected.detach().to(dtype)
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        losses = (h - 1 / (2 * beta)) ** 2
    return DPOOutput(losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), losses)
