"""Hydra command-line apps."""
