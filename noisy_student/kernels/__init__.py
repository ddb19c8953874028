"""The CPU training kernels: the C++ source and its loader."""
