"""Error types that carry the documented exit codes (contract.md, "Exit codes").

Library code raises these; the CLI turns them into one short stderr message, the
``--json`` document and the process exit code. Anything else is a bug (exit 1).
"""
from __future__ import annotations


class DistillError(Exception):
    """Base class: an expected failure with a user-facing message and an exit code."""

    exit_code = 1

    def __init__(self, message: str, *, details: object | None = None):
        super().__init__(message)
        self.message = message
        self.details = details


class BadInput(DistillError):
    """Invalid recipe or option, missing or unreadable file, incompatible pair or data."""

    exit_code = 2


class GateFailed(DistillError):
    """A quality gate failed: accuracy floor, parity tolerance or latency budget."""

    exit_code = 3


class MissingCapability(DistillError):
    """CUDA asked for but absent, TensorRT not installed, an execution provider fell back."""

    exit_code = 4


class ExportFailed(DistillError):
    """ONNX export, TensorRT parse or build failed."""

    exit_code = 5


class Diverged(DistillError):
    """NaN, Inf or exploding loss; the last good checkpoint, if any, is kept."""

    exit_code = 6


class Collapsed(Diverged):
    """The student ended at chance level while its teacher is far above it (``train.collapse_verdict``)."""


class Interrupted(DistillError):
    """SIGINT/SIGTERM; a resumable checkpoint was written."""

    exit_code = 130
