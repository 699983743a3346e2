"""Hydra configs of the command-line apps (a package so installed apps find them)."""
