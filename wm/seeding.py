"""Seeds derived from a run's seed and a key (an episode's seed, a row, a batch's indices)."""

from __future__ import annotations

import numpy as np


def derived_seed(seed: int, *key: int) -> np.random.SeedSequence:
    """The seed sequence of `key` under `seed`: `key` is numpy's spawn key, kept apart from the seed's
    words (a plain entropy list joins 32-bit words: [5 + 7 * 2**32, 0] and [5, 7] draw alike), so
    distinct (seed, key) pairs give distinct streams for keys of one length with entries below 2**32
    (episode seeds, rows, window indices). `seed` is taken modulo 2**64, so a negative one is accepted;
    the key's entries must be non-negative."""
    return np.random.SeedSequence(seed % 2**64, spawn_key=tuple(int(k) for k in key))


def derived_rng(seed: int, *key: int) -> np.random.Generator:
    """A NumPy generator seeded with `derived_seed(seed, *key)`."""
    return np.random.default_rng(derived_seed(seed, *key))


def derived_torch_seed(seed: int, *key: int) -> int:
    """A 64-bit seed for `torch.Generator.manual_seed`, from `derived_seed(seed, *key)`."""
    return int(derived_seed(seed, *key).generate_state(1, np.uint64)[0])
