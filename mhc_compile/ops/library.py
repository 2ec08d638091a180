"""torch.library registration of the fused Triton kernels (filled in by the kernels work)."""

from __future__ import annotations

KERNELS_AVAILABLE = False


def check_backend(backend: str) -> None:
    """Raise a clear error when ``backend="triton"`` is asked for but cannot run."""
    if backend == "triton" and not KERNELS_AVAILABLE:
        raise RuntimeError(
            "backend='triton' needs the Triton package; install it or use backend='torch'"
        )
