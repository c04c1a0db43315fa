"""The contract between the core and whatever runs the model (simulator or GPU)."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from core.scheduler_output import SchedulerOutput, StepResult


@runtime_checkable
class Backend(Protocol):
    """Runs one scheduled step.

    The backend owns time: the simulator predicts ``StepResult.duration`` with a cost
    model, the executor measures it. The engine never reads a clock; the caller passes
    the step's start time to ``EngineCore.step(now)``.
    """

    def execute(self, scheduler_output: SchedulerOutput) -> StepResult: ...
