"""Batches built on a background thread while the step runs, in exactly the loop's order.

The ExampleLoader draws flips, caption shuffles/dropout and crops from one seeded
random stream, so batches must be made in the order the loop consumes them: one
thread walks the same schedule the loop walks (epochs, skipped batches on resume,
the step number each micro-batch sees) and hands batches over through a short
queue. Image decoding (PIL releases the GIL) then overlaps the UNet step. The
stream state saved with a training state is the one after the last batch the loop
*took*, not the last one prefetched, so a resumed run draws what an unbroken one does.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch

from loracli.run.data import Batch, BucketBatches, ExampleLoader

Job = tuple[list[int], int, int]  # (indices, epoch, global step when the batch is used)


def planned_jobs(batches: BucketBatches, start_epoch: int, epochs: int, skip: int, grad_accum: int,
                 global_step: int, total_steps: int) -> Iterator[Job]:
    """The micro-batches the training loop will ask for, with the step each one sees (the loop's own walk:
    an update every `grad_accum` micro-batches and at the end of each epoch, stop at total_steps)."""
    step = global_step
    for epoch in range(start_epoch, epochs + 1):
        epoch_batches = batches.epoch_batches(epoch)
        for i, indices in enumerate(epoch_batches):
            if epoch == start_epoch and i < skip:
                continue
            yield indices, epoch, step
            if (i + 1) % grad_accum == 0 or i == len(epoch_batches) - 1:
                step += 1
                if step >= total_steps:
                    return


class BatchPrefetcher:
    """`prefetcher(indices, epoch, step)` returns what `loader(indices, epoch, step)` would, built ahead.

    depth 0 builds each batch when asked (no thread). `rng_state` is the loader's random state after
    the last batch handed out: what a training state must record."""

    def __init__(self, loader: ExampleLoader, jobs: Iterator[Job], depth: int = 2, pin_memory: bool = False):
        self.loader = loader
        self.pin_memory = pin_memory
        self.rng_state = loader.rng.getstate()
        self.depth = depth
        self._jobs = jobs
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._thread = threading.Thread(target=self._work, name="loracli-prefetch", daemon=True)
            self._thread.start()

    def _build(self, job: Job) -> Batch:
        batch = self.loader(*job)
        if self.pin_memory and batch.pixels is not None:
            batch.pixels = batch.pixels.pin_memory()  # lets the copy to the GPU run asynchronously
        return batch

    def _work(self) -> None:
        try:
            for job in self._jobs:
                if self._stop.is_set():
                    return
                item = (job, self._build(job), self.loader.rng.getstate())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread, raised there
            self._queue.put(("error", exc, None))

    def __call__(self, indices: list[int], epoch: int, step: int) -> Batch:
        if self._thread is None:
            batch = self._build((indices, epoch, step))
            self.rng_state = self.loader.rng.getstate()
            return batch
        job, batch, state = self._queue.get()
        if job == "error":
            raise batch
        if job != (indices, epoch, step):  # the walk above and the loop disagree: a bug, never a silent change
            raise RuntimeError(f"prefetched batch {job} but the loop asked for {(indices, epoch, step)}")
        self.rng_state = state
        return batch

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)  # unblock a put
                except queue.Empty:
                    pass
            self._thread.join()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A non-blocking copy when the source is pinned (CUDA), a plain one otherwise."""
    return tensor.to(device, non_blocking=tensor.is_pinned())
