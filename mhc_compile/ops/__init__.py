"""mHC ops: the plain-PyTorch reference, the Triton kernels and their registration."""
