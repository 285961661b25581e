"""What the loop needs from the host between steps, at the least cost.

- LossWatch: losses stay on the device and are read (one sync for several steps) every
  `every` steps and always before a save, a sample or a state; a NaN/inf still stops the run,
  naming the first step it appeared at.
- average_gradients: the multi-process gradient mean as a few flat all-reduces (buckets of
  about 25 MiB, as DDP does) instead of one collective per LoRA tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from loracli.errors import TrainingError

BUCKET_BYTES = 25 * 2**20


@dataclass
class LossRecord:
    step: int
    epoch: int
    loss: float
    lrs: dict[str, float]


@dataclass
class LossWatch:
    every: int
    pending: list[tuple[int, int, torch.Tensor, dict[str, float]]] = field(default_factory=list)

    def add(self, step: int, epoch: int, loss: torch.Tensor, lrs: dict[str, float]) -> None:
        self.pending.append((step, epoch, loss.detach().reshape(()), lrs))

    def due(self) -> bool:
        return len(self.pending) >= self.every

    def flush(self) -> list[LossRecord]:
        """The pending losses as floats (one host sync); raises at the first non-finite one."""
        if not self.pending:
            return []
        values = torch.stack([p[2].float() for p in self.pending]).tolist()
        records = [LossRecord(step, epoch, value, lrs)
                   for (step, epoch, _, lrs), value in zip(self.pending, values)]
        self.pending.clear()
        for r in records:
            if not math.isfinite(r.loss):
                raise TrainingError(f"the loss became {r.loss} at step {r.step} (epoch {r.epoch}); "
                                    "lower the learning rate or use fp32/bf16; earlier saves are kept")
        return records


def loss_check_interval(device: torch.device) -> int:
    """Every step on a CPU (reading a CPU tensor costs nothing); every 10 on an accelerator,
    where each read waits for the queued GPU work."""
    return 1 if device.type == "cpu" else 10


def _buckets(grads: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    out: list[list[torch.Tensor]] = []
    for same in by_dtype.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for g in same:
            if bucket and size + g.numel() * g.element_size() > bucket_bytes:
                out.append(bucket)
                bucket, size = [], 0
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket:
            out.append(bucket)
    return out


def average_gradients(reduce, params: list[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> int:
    """Replace each gradient by its mean over the processes; `reduce(tensor, "mean")` is
    accelerator.reduce. Returns the number of collectives issued."""
    grads = [p.grad for p in params if p.grad is not None]
    buckets = _buckets(grads, bucket_bytes)
    for bucket in buckets:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        flat = reduce(flat, "mean")
        offset = 0
        for g in bucket:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n
    return len(buckets)
