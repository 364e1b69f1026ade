"""Triton kernels, installed as `minidpo.kernels`; one module per op (`logprobs`, `nf4`).

Nothing is imported here, so `import minidpo.kernels` works without triton; importing a
submodule needs triton.
"""
