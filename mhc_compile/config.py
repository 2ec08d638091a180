"""One dataclass holding every option of a conversion, validated with clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch

from .errors import MHCConfigError

MODES = ("mhc", "hc", "residual")
INITS = ("preserve", "paper")
BACKENDS = ("auto", "triton", "torch")
COLLAPSES = ("mean", "sum")
RECOMPUTES = (None, "mhc")
MAX_STREAMS = 8


@dataclass(frozen=True)
class MHCConfig:
    """Options of one conversion.

    Attributes:
        n_streams: number of residual streams ``n`` (1..8).
        mode: ``"mhc"`` (Sinkhorn-projected mixing), ``"hc"`` (unconstrained
            Hyper-Connections) or ``"residual"`` (analysis only, model unchanged).
        init: ``"preserve"`` (converted model computes the original function at
            step 0) or ``"paper"`` (DeepSeek-style init for training from scratch).
        sinkhorn_iters: Sinkhorn-Knopp iterations ``t_max``.
        collapse: how the n streams are merged where a chain ends: ``"mean"`` or ``"sum"``.
        backend: ``"auto"`` (Triton kernels on CUDA, reference elsewhere),
            ``"triton"`` or ``"torch"`` (the plain-PyTorch reference ops).
        rms_eps: epsilon of the RMS normalisation of the flattened streams.
        channel_dim: channel axis of the residual stream; ``None`` picks ``-1`` for
            token models and ``1`` for convolutional blocks.
        fuse_adjacent: let the lowering pass fuse ``post(l)`` with ``pre(l+1)``
            where both connections live in the same block (on by default: two adjacent
            connections train about a fifth faster fused, see
            ``benchmarks/results/kernels-h100.md``), and hand each pre side the Llama-style
            RMSNorm that follows it, which the kernels then compute in the pre side's own
            launch in no-grad decode calls, eager or compiled (:mod:`mhc_compile.passes.norm`).
        recompute_streams: with ``fuse_adjacent``, the kernels' backward recomputes the
            stream state between a block's two connections from the block's input stream and
            the first branch's output instead of storing it (on by default: one ``[..., n, C]``
            tensor less stored per block; the backward reads one branch output more), see
            :mod:`mhc_compile.passes.streams`. ``False`` stores it.
        stream_dtype: dtype of the n-stream tensor. ``None`` (default): the autocast dtype
            when a float32 residual runs under autocast (bf16 streams move half the bytes;
            Hugging Face models keep a float32 residual under autocast), else the dtype of
            the residual stream it replaces. ``torch.float32`` keeps float32 streams under
            autocast too (the opt-out).
        recompute: ``None`` or ``"mhc"``: in backward, recompute the mHC ops and the other
            cheap ops of each converted block instead of storing their outputs (see
            :mod:`mhc_compile.recompute`).
        deterministic: the fused kernels give bitwise-identical gradients run to run (the
            post backward sums its channel partials in a fixed order instead of with
            float32 atomics). Also on whenever ``torch.use_deterministic_algorithms(True)``.
    """

    n_streams: int = 4
    mode: str = "mhc"
    init: str = "preserve"
    sinkhorn_iters: int = 20
    collapse: str = "mean"
    backend: str = "auto"
    rms_eps: float = 1e-6
    channel_dim: Optional[int] = None
    fuse_adjacent: bool = True
    recompute_streams: bool = True
    stream_dtype: Optional[torch.dtype] = None
    recompute: Optional[str] = None
    deterministic: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.n_streams, int) or isinstance(self.n_streams, bool):
            raise MHCConfigError(f"n_streams must be an int, got {self.n_streams!r}")
        if not 1 <= self.n_streams <= MAX_STREAMS:
            raise MHCConfigError(
                f"n_streams must be between 1 and {MAX_STREAMS}, got {self.n_streams}; "
                "mHC uses small n (the paper uses 4)"
            )
        _check_choice("mode", self.mode, MODES)
        _check_choice("init", self.init, INITS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("collapse", self.collapse, COLLAPSES)
        if not isinstance(self.sinkhorn_iters, int) or self.sinkhorn_iters < 1:
            raise MHCConfigError(
                f"sinkhorn_iters must be a positive int, got {self.sinkhorn_iters!r}"
            )
        if self.rms_eps <= 0:
            raise MHCConfigError(f"rms_eps must be > 0, got {self.rms_eps!r}")
        if self.stream_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise MHCConfigError(
                f"stream_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, "
                f"got {self.stream_dtype!r}"
            )
        if not isinstance(self.recompute_streams, bool):
            raise MHCConfigError(f"recompute_streams must be True or False, got {self.recompute_streams!r}")
        if not isinstance(self.deterministic, bool):
            raise MHCConfigError(f"deterministic must be True or False, got {self.deterministic!r}")
        if self.recompute not in RECOMPUTES:
            raise MHCConfigError(f"unknown recompute {self.recompute!r}; choose None or 'mhc'")
        if self.channel_dim not in (None, 1, -1):
            raise MHCConfigError(
                f"channel_dim must be None, 1 (channels-first) or -1 (channels-last), "
                f"got {self.channel_dim!r}"
            )

    @property
    def n_coeffs(self) -> int:
        """Width of the coefficient projection: ``n^2 + 2n``."""
        return self.n_streams * self.n_streams + 2 * self.n_streams

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-serialisable values (``stream_dtype`` as ``"bfloat16"`` etc.)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.stream_dtype is not None:
            out["stream_dtype"] = str(self.stream_dtype).removeprefix("torch.")
        out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MHCConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`MHCConfigError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MHCConfigError(
                f"unknown mHC option(s) {', '.join(map(repr, unknown))}; the saved options were "
                f"written by another version of mhc_compile (known: {', '.join(sorted(known))})"
            )
        values = dict(data)
        dtype = values.get("stream_dtype")
        if isinstance(dtype, str):
            resolved = getattr(torch, dtype, None)
            if not isinstance(resolved, torch.dtype):
                raise MHCConfigError(f"stream_dtype {dtype!r} is not a torch dtype name")
            values["stream_dtype"] = resolved
        return cls(**values)


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise MHCConfigError(
            f"unknown {name} {value!r}; choose one of {', '.join(repr(c) for c in choices)}"
        )
