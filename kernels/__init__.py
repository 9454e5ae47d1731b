"""Triton kernels of fused_ensemble (installed as ``fused_ensemble.kernels``).

Pure ``@triton.jit`` kernels and their thin launchers; no nn.Module or autograd code lives here. Importing a
kernel module needs triton; the package's dispatch code imports them lazily.
"""
