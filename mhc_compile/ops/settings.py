"""Named kernel settings: how a projection dot is computed and how a kernel is tiled.

Pure Python (no Triton import), so the tuner in ``benchmarks/mhc_kernels.py`` and the
registration in :mod:`mhc_compile.ops.library` can name them on any machine. The Triton
kernels receive ``int(DotMode.X)`` as a ``tl.constexpr`` and compare it against the
``tl.constexpr`` mirrors in :mod:`mhc_compile.ops.triton.kernels`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from ..errors import MHCConfigError


class DotMode(enum.IntEnum):
    """How a kernel computes ``a @ b`` for a float32 ``b`` (``phi`` or its transpose).

    ``IEEE_FP32``: one float32 IEEE dot (no tensor-core rounding; the interpreter's mode).
    ``SPLIT_B``: ``a`` is 16-bit; ``b`` is split on chip into hi + lo parts of ``a``'s
    dtype: two tensor-core dots, float32-accurate products.
    ``SPLIT_AB``: ``a`` and ``b`` both split into bf16 hi + lo: three tensor-core dots
    (the ``lo * lo`` term is dropped, about ``2^-16`` relative).
    ``BF16``: one bf16 dot, for results that are rounded to 16 bits anyway.
    """

    IEEE_FP32 = 0
    SPLIT_B = 1
    SPLIT_AB = 2
    BF16 = 3


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch shape: ``tokens`` rows and ``channels`` columns per program
    (a chunk of ``channels`` per loop step where the program walks a channel range),
    ``warps`` per program and ``stages`` of software pipelining (``None``: Triton's default)."""

    tokens: int
    channels: int
    warps: int
    stages: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("tokens", "channels", "warps", "stages"):
            value = getattr(self, name)
            if name == "stages" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MHCConfigError(f"Tiles.{name} must be a positive int, got {value!r}")

    def __str__(self) -> str:
        stages = f", {self.stages} stages" if self.stages else ""
        return f"{self.tokens} tokens x {self.channels} channels, {self.warps} warps{stages}"

    def launch(self, *, channels: bool = True) -> dict:
        """Keyword arguments of a kernel launch: ``BM`` (and ``BC`` unless ``channels`` is
        False), ``num_warps`` and, where set, ``num_stages``."""
        args = {"BM": self.tokens, "num_warps": self.warps}
        if channels:
            args["BC"] = self.channels
        if self.stages is not None:
            args["num_stages"] = self.stages
        return args


__all__ = ["DotMode", "Tiles"]
