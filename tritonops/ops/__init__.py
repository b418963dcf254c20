"""Torch-facing ops: validate, build the problem, pick a config, launch."""
