"""Where the kernel's ``/sys`` is: the real one, or another tree named by
``EDGEFARM_SYS_ROOT`` (a container that mounts the host's ``/sys`` elsewhere; tests)."""

from __future__ import annotations

import os
from pathlib import Path

SYS = Path(os.environ.get("EDGEFARM_SYS_ROOT") or "/sys")
