"""Hydra command-line apps.

Every app is imported as `tools.<app>` (console scripts and `python -m tools.<app>`), so this package's
`__init__` runs before any app module and hence before anything imports mujoco, which reads MUJOCO_GL
once, at its import. The apps render headless (EGL) unless the caller chose another backend.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
