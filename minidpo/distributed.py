"""Data-parallel training on torch.distributed, as `torchrun` launches it.

    init(device, timeout_s) -> Dist   this process's rank, world size and device, from torchrun's
                                      environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
                                      NCCL on GPUs, gloo on CPU; one process: no process group
    share(indices, d)                 this rank's pairs of one global micro-batch
    wrap(module, d, full=...)         DDP (LoRA: every rank holds the whole frozen base and syncs
                                      only the adapters' gradients) or FSDP2 (`fully_shard` per
                                      decoder layer, then the root: full fine-tunes)
    grad_sync(module, last)           gradient accumulation: sync only on a step's last micro-batch
    save_sharded / load_sharded       FSDP2 model + optimizer through torch.distributed.checkpoint
    full_state_dict(module, d)        the whole model on rank 0 (for the final Hugging Face folder)

Every rank runs the same forwards in the same order: DDP and FSDP2 pair them up in collectives, so
a rank left without pairs (a last micro-batch smaller than the world) still runs one, weighted 0.
A collective that waits longer than `timeout_s` raises on the waiting rank, which then exits, and
torchrun ends the job: a dead or hung rank never leaves the others waiting for ever.
"""
import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    """Where this process stands; `world == 1` is a plain one-process run (no collectives)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and writes files."""
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over the ranks (a new tensor on `t`'s device; `t` itself when world is 1)."""
        if self.world == 1:
            return t
        out = t.to(self.device, copy=True)
        dist.all_reduce(out)
        return out.to(t.device)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def from_main(self, obj):
        """Rank 0's `obj` on every rank (pickled; what the other ranks pass is ignored)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; small objects only)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


ONE = Dist()  # a one-process run: the default of every function that takes a Dist


def _device(setting: str, local_rank: int, world: int) -> torch.device:
    """`auto`: CUDA when present. With several processes each rank takes GPU `local_rank`."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    return device


def init(device: str = "auto", timeout_s: float = 1800.0) -> Dist:
    """This process's Dist; joins the process group torchrun set up (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    d = Dist(rank=rank, world=world, local_rank=local, device=_device(device, local, world))
    if world == 1:
        return d
    if d.device.type == "cuda":
        torch.cuda.set_device(d.device)
    if not dist.is_initialized():
        backend = "nccl" if d.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=d.device if d.device.type == "cuda" else None)
    return d


def close(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def share(indices: list, d: Dist) -> tuple[list, float]:
    """-> (this rank's part of a global micro-batch, `real`): every `world`-th pair from `rank`, 1.0.

    A rank left with none takes the micro-batch's first pair as a stand-in, `real` 0.0: it runs the
    forward and backward every other rank runs (DDP and FSDP need that) and adds nothing.
    """
    mine = indices[d.rank::d.world]
    return (mine, 1.0) if mine else (indices[:1], 0.0)


# ---------------------------------------------------------------------------------------------------
# Wrapping the model.

def wrap(module: nn.Module, d: Dist, *, full: bool) -> nn.Module:
    """DDP for LoRA runs (`full=False`), FSDP2 for full fine-tunes; `module` itself when world is 1.

    `module.forward` must run the whole computation that needs the parameters: both wrappers hook
    `forward` (DDP to sync gradients, FSDP2 to gather the shards).
    """
    if d.world == 1:
        return module
    if full:
        return shard(module)
    ids = [d.device.index] if d.device.type == "cuda" else None
    # The frozen base has no gradients: only the adapters are bucketed and all-reduced.
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False,
                                   gradient_as_bucket_view=True)


def shard(module: nn.Module) -> nn.Module:
    """FSDP2: each decoder layer its own unit (gathered just in time), the rest with the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(module):
        fully_shard(layer)
    return fully_shard(module)


def _decoder_layers(module: nn.Module) -> list:
    from minidpo.model import DecoderLayer

    return [m for m in module.modules() if isinstance(m, DecoderLayer)]


def is_sharded(module: nn.Module) -> bool:
    """FSDP2-wrapped: weights and optimizer states are split across the ranks."""
    from torch.distributed.fsdp import FSDPModule  # about a second to import: only when asked

    return isinstance(module, FSDPModule)


def is_wrapped(module: nn.Module) -> bool:
    return isinstance(module, DistributedDataParallel) or is_sharded(module)


def grad_sync(module: nn.Module, last: bool):
    """Context for one micro-batch's backward: gradients are reduced across ranks only when `last`
    (the step's last micro-batch); before that they accumulate locally."""
    if isinstance(module, DistributedDataParallel) and not last:
        return module.no_sync()
    if is_sharded(module):
        module.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def local_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s result as a plain tensor (FSDP2 returns a replicated DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ---------------------------------------------------------------------------------------------------
# FSDP2 checkpoints.

def save_sharded(folder, module: nn.Module, optimizer) -> None:
    """Every rank writes its shards of the model and optimizer into `folder` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))


def load_sharded(folder, module: nn.Module, optimizer) -> None:
    """Read `save_sharded`'s folder back into the (same-shaped, same-world) model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(module: nn.Module) -> dict:
    """The unsharded model state on CPU, on rank 0 (an empty dict elsewhere); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)
