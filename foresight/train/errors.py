"""What can stop a training run, as exception types the CLI maps to exit codes."""

from __future__ import annotations


class TrainingError(Exception):
    """Training cannot start or continue; the message says why."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, incomplete, damaged or from a different run; the message names the path."""


class DivergedError(TrainingError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""
