"""Triton kernels of effattn, installed as ``effattn.kernels``: one module per op."""
