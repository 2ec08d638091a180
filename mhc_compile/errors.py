"""The exception hierarchy: every error mhc_compile raises on purpose is an :class:`MHCError`.

Each class also keeps the built-in base it had before (``ValueError`` or ``RuntimeError``),
so existing ``except ValueError`` code keeps working::

    MHCError
    |-- MHCConfigError    (also ValueError)    an option is out of range, unknown or conflicting
    |-- ConversionError   (also ValueError)    the model cannot be converted as asked
    |   `-- NoResidualError                    the model has no residual add (defined in api.py)
    |-- CaptureError      (also RuntimeError)  the model or a block cannot be captured as a graph
    |-- CheckpointError   (also ValueError)    a checkpoint lacks what restoring a converted model needs
    `-- KernelInputError  (also ValueError)    an input the fused kernels cannot take (ops/library.py)
"""

from __future__ import annotations


class MHCError(Exception):
    """Base class of every error raised by mhc_compile on purpose; the message names the fix."""


class MHCConfigError(MHCError, ValueError):
    """An option passed to :func:`mhc_compile` is out of range, unknown or conflicting."""


class ConversionError(MHCError, ValueError):
    """The model cannot be converted as asked; the message says which part and why."""


class CaptureError(MHCError, RuntimeError):
    """The model (or one of its blocks) could not be captured as a graph."""


class CheckpointError(MHCError, ValueError):
    """A checkpoint does not hold what restoring a converted model needs (options or mHC weights)."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message ("" for an empty one), for quoting a cause inside
    one of our messages."""
    text = str(err)
    return text.splitlines()[0] if text else ""


__all__ = ["MHCError", "MHCConfigError", "ConversionError", "CaptureError", "CheckpointError", "first_line"]
