"""training.torch_compile: the UNet (with the network's layers inside it) through torch.compile.

sd-scripts hands --dynamo_backend to accelerate, which compiles the prepared UNet; loracli does
not prepare the UNet, so it compiles it in place (`Module.compile`: the object, its attributes
and its hooks stay the same). Compiling happens at the first forward and again for each new input
shape until torch marks the sizes dynamic (its default), so the first steps are slow: the run
reports the time to its first step apart from the steady state.
"""

from __future__ import annotations

import time

from loracli.errors import Problem, TrainingError


def compile_unet(unet, backend: str) -> None:
    unet.compile(backend=backend)


def compile_failure(exc: BaseException, backend: str) -> TrainingError | None:
    """A torch.compile failure as a one-line run-time error naming the option (None: not one)."""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # pragma: no cover - torch without dynamo
        return None
    if not isinstance(exc, TorchDynamoException):
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    other = "aot_eager" if backend != "aot_eager" else "a different one"
    return TrainingError(Problem("training.torch_compile", f'torch.compile with backend "{backend}" failed: {first}',
                                 f'set training.dynamo_backend = "{other}" (no C compiler needed), or remove '
                                 "torch_compile"))


class StepTiming:
    """Time to the first optimizer step (which compiles the UNet with torch_compile) apart from the
    steady state after it, in the log and in status.json (first_step_s, steady_step_s)."""

    def __init__(self, compiling: bool):
        self.compiling = compiling
        self.started = time.perf_counter()
        self.first_done: float | None = None
        self.last_done = 0.0
        self.steps = 0

    def start(self) -> None:
        self.started = time.perf_counter()

    def stepped(self, status, log) -> None:
        self.steps += 1
        self.last_done = time.perf_counter()
        if self.first_done is not None:
            return
        self.first_done = self.last_done
        first = self.first_done - self.started
        status.write(first_step_s=round(first, 3))
        log(f"first step: {first:.1f}s" + (" (includes compiling the UNet)" if self.compiling else ""))

    def steady_step_s(self) -> float | None:
        if self.first_done is None or self.steps < 2:
            return None
        return (self.last_done - self.first_done) / (self.steps - 1)

    def finished(self, status, log) -> None:
        steady = self.steady_step_s()
        if steady is None:
            return
        status.write(steady_step_s=round(steady, 4))
        log(f"steady state: {steady:.3f}s per step after the first "
            f"(time to first step {self.first_done - self.started:.1f}s)")
