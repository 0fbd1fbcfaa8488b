"""Triton kernels of matnet, importable as `matnet.kernels`.

Importing this package needs triton; `matnet.ops` imports it lazily and falls back to the
reference paths when triton is missing.
"""
