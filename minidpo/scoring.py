"""A batch's per-sequence log-probs under a model (`batch_logps`, either batch layout) and the module
DDP/FSDP2 wrap so that every use of the weights runs inside `forward`. Imports logprobs, prefix, distributed.
"""
import torch
from torch import nn

from minidpo import distributed
from minidpo.logprobs import model_logprobs
from minidpo.prefix import is_packed, packed_logps


class BatchLogpsModule(nn.Module):
    """The policy as DDP and FSDP2 wrap it: `forward(batch, average)` is `batch_logps` of the inner
    model, so every use of the weights (hidden states and the fused head) happens inside `forward`,
    the method both wrappers hook."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, average: bool = False) -> torch.Tensor:
        return batch_logps(self.model, batch, average=average)


def unwrap(model: nn.Module) -> nn.Module:
    """The Mistral inside a DDP or FSDP2 wrapped BatchLogpsModule (the model itself otherwise)."""
    model = getattr(model, "module", model)  # DDP
    return model.model if isinstance(model, BatchLogpsModule) else model


def batch_logps(model: nn.Module, batch: dict, *, average: bool = False) -> torch.Tensor:
    """[R] fp32: log-prob of each row's reply under `model` (summed, or per-token mean).

    `minidpo.logprobs.model_logprobs` picks the fused head or the logits. Labels are unshifted
    (position t's output scores label t + 1), so a shifted view is read in place. A packed batch (prefix
    sharing) goes to `minidpo.prefix.packed_logps`: the same [2b], chosen then rejected.
    """
    if distributed.is_wrapped(model):
        return model(batch, average=average)
    if is_packed(batch):
        return packed_logps(model, batch, average=average)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
    return model_logprobs(model, ids, (labels,), attention=mask, average=average)
