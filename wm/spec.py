"""What a model reads and writes, stated once: the I/O spec.

Training, evaluation, the planner builder and deployment read a model's `io_spec` instead of
reaching into its config. A model's observations are camera frames and (optionally) one
proprioception vector; it conditions on `history` observations taken `frameskip` control steps
apart (and, with `past_actions`, on the raw actions executed between them); it outputs raw actions
of `action_dim` values, one per control step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from wm.options import is_whole


@dataclass(frozen=True)
class IOSpec:
    """image_keys: the cameras, in the order the model reads them (none for a state-only model);
    image_size: (H, W) the model was trained on; proprio_key / proprio_dim: the proprioception key
    and its size (None / 0: none); action_key / action_dim: the raw action key and its size;
    history: observation steps the model conditions on; frameskip: control steps between two of
    them (and raw actions per model step); past_actions: the model also takes the raw actions
    executed between its history frames."""

    image_keys: tuple[str, ...]
    image_size: tuple[int, int]
    proprio_key: str | None
    proprio_dim: int
    action_dim: int
    action_key: str = "action"
    history: int = 1
    frameskip: int = 1
    past_actions: bool = False

    def __post_init__(self) -> None:
        # int() would cut image_size (64.5, 64) to (64, 64) and tuple() split "64" into ("6", "4")
        size = self.image_size
        if (
            isinstance(size, str | bytes)
            or not isinstance(size, Iterable)
            or not all(is_whole(s) for s in size)
        ):
            raise ValueError(f"image_size must be (H, W) whole numbers, got {size!r}")
        if isinstance(self.image_keys, str | bytes):  # tuple("cam") is ("c", "a", "m")
            raise ValueError(f"image_keys must be a list of cameras, got the string {self.image_keys!r}")
        if not isinstance(self.past_actions, bool):  # ("no" is true)
            raise ValueError(f"past_actions must be true or false, got {self.past_actions!r}")
        wrong = [
            f"{name}={v!r}"
            for name, v in (
                ("proprio_dim", self.proprio_dim),
                ("action_dim", self.action_dim),
                ("history", self.history),
                ("frameskip", self.frameskip),
            )
            if not is_whole(v)
        ]
        if wrong:
            raise ValueError(f"I/O spec: {', '.join(wrong)} must be whole numbers")
        object.__setattr__(self, "image_keys", tuple(self.image_keys))
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        if not self.image_keys and not self.proprio_key:
            raise ValueError("an I/O spec needs a camera or a proprioception key")
        if len(set(self.obs_keys)) < len(self.obs_keys):  # one key read as two inputs
            raise ValueError(f"I/O spec: observation keys {list(self.obs_keys)} name one key twice")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (H, W), got {self.image_size}")
        if (self.proprio_key is None) != (self.proprio_dim == 0) or self.proprio_dim < 0:
            raise ValueError(f"proprio_key {self.proprio_key!r} and proprio_dim {self.proprio_dim} disagree")
        if self.action_dim < 1 or self.history < 1 or self.frameskip < 1:
            raise ValueError(
                f"action_dim, history and frameskip must be >= 1, got {self.action_dim}, {self.history}, "
                f"{self.frameskip}"
            )

    @property
    def obs_keys(self) -> tuple[str, ...]:
        """Every observation key the model reads: cameras, then proprioception."""
        return self.image_keys + ((self.proprio_key,) if self.proprio_key else ())

    @property
    def window(self) -> int:
        """Control steps of observations the model's history spans: (history - 1) * frameskip + 1."""
        return (self.history - 1) * self.frameskip + 1
