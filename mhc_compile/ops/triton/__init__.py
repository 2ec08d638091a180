"""Triton kernels (graph-agnostic)."""
