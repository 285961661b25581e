"""Per-sample random draws (noise, timesteps, input perturbation) of a step across processes.

Every process is seeded alike (accelerate's set_seed, as in sd-scripts), so if each drew noise for
its own batch, every process would draw the same noise and timesteps: N processes would train
on N different images with one noise sample and one timestep between them, and would not match
one process with the N-times batch. sd-scripts does exactly that. loracli draws for the whole
step's batch (N × train_batch_size rows) on every process and each keeps its own rows: the same
draws one process with the N-times batch would make, in the same order, so N processes train as
that one process does (tests/cpu/test_multiprocess.py holds them to it). With one process this is
the plain draw.
"""

from __future__ import annotations

import torch


class GlobalDraws:
    def __init__(self, rank: int, world: int, batch_size: int):
        self.rank, self.world, self.batch_size = rank, world, batch_size

    def widen(self, local: torch.Tensor) -> torch.Tensor:
        """The whole step's batch shape with this process's rows in place (zeros elsewhere):
        what the draws are made for."""
        if self.world == 1:
            return local
        wide = local.new_zeros((self.world * self.batch_size, *local.shape[1:]))
        wide[self._rows(local.shape[0])] = local
        return wide

    def own(self, wide: torch.Tensor, local_rows: int) -> torch.Tensor:
        """This process's rows of a draw made for the whole batch."""
        return wide if self.world == 1 else wide[self._rows(local_rows)]

    def _rows(self, count: int) -> slice:
        start = self.rank * self.batch_size  # a short last batch keeps its place: rows never overlap
        return slice(start, start + count)
