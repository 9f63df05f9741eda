"""Triton kernels of dora_fx and their launchers; ``reference`` holds the plain-PyTorch math."""
