"""Data-parallel training under `torchrun`: process group, device, reductions, weight digests.

    torchrun --nproc-per-node 2 -m training.train --data-dir ... --device cpu    # gloo
    torchrun --nproc-per-node 8 -m training.train --data-dir ... --device cuda   # nccl, gloo for CPU tensors

Without torchrun's RANK/WORLD_SIZE variables everything here is a single-process no-op.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA GPU is visible; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not one of ('auto', 'cpu', 'cuda')")
    return torch.device(name)


def backend_for(device: torch.device) -> str:
    """The process group's backend: on CUDA nccl for CUDA tensors and gloo for the CPU tensors the epoch
    totals and confusion matrices are reduced in (nccl alone has no CPU collectives)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init(device_name: str, environ: dict | None = None) -> Context:
    """Join the torchrun process group if one is described in `environ` (default: os.environ)."""
    env = os.environ if environ is None else environ
    device = resolve_device(device_name)
    if "RANK" not in env or int(env.get("WORLD_SIZE", "1")) <= 1:
        return Context(device=device)
    rank, world_size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device), rank=rank, world_size=world_size)
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.distributed:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_buffers(model: torch.nn.Module, ctx: Context) -> None:
    """Average float buffers (BatchNorm running statistics) over ranks, so every rank holds the
    same model after an epoch (DDP synchronises gradients, not the statistics each rank collects)."""
    if not ctx.distributed:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(ctx.world_size)


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes): equal digests = equal weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def gather_strings(value: str, ctx: Context) -> list[str]:
    if not ctx.distributed:
        return [value]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out

