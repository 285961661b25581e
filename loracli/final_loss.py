"""One definition of "final loss", shared by the progress bar, the end-of-run summary, `loracli report`
and loss.png: the mean of the last FINAL_LOSS_STEPS logged steps.

A single step's diffusion loss is mostly noise (it depends on the timestep drawn), so the last step
alone says little; a short mean says what the run ended at, and is the same number everywhere.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

FINAL_LOSS_STEPS = 10


def final_loss(losses: Sequence[float]) -> float | None:
    """Mean of the last FINAL_LOSS_STEPS losses (fewer when the run logged fewer); None for none."""
    tail = list(losses)[-FINAL_LOSS_STEPS:]
    return sum(tail) / len(tail) if tail else None


def final_loss_steps(logged: int) -> int:
    """How many steps final_loss averaged: FINAL_LOSS_STEPS, or all of a shorter run."""
    return min(FINAL_LOSS_STEPS, logged)


def describe(logged: int) -> str:
    n = final_loss_steps(logged)
    return f"mean of the last {n} step{'s' if n != 1 else ''}"


class RollingLoss:
    """The bar's loss: final_loss() of the steps so far, updated step by step."""

    def __init__(self) -> None:
        self.window: deque[float] = deque(maxlen=FINAL_LOSS_STEPS)

    def add(self, loss: float) -> float:
        self.window.append(loss)
        return sum(self.window) / len(self.window)
