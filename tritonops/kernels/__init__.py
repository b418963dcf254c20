"""Triton kernels only (@triton.jit code), one file per op family. No torch here."""
