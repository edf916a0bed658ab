"""Triton kernels of vlmfast, installed as `vlmfast.kernels`: one file per op, kernels and
launchers only (autograd and backend dispatch live in vlmfast.ops)."""
