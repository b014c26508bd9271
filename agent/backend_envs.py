"""Backends that run in their own Python environment.

A runtime whose dependencies conflict with the agent's (Foundry Local's SDK pins another
onnxruntime and protobuf; vLLM's CPU build brings its own torch) is installed into a
separate virtual environment, and ``edgefarm agent serve --backend-env NAME=PATH`` makes
the agent run that backend's measuring children (``python -m agent.trial``) with that
environment's interpreter. The environment needs the backend's runtime, ``psutil`` and
``numpy`` (what the trial child imports besides the runtime); the agent's own code
reaches the child through ``PYTHONPATH``: a folder holding links to the ``agent`` and
``edgefarm`` packages only, so nothing else of the agent's environment leaks in.

The probe asks each environment's interpreter which version of the backend it has
(:func:`probe_env_backends`), so the backend is announced like any other, and results
record the environment and its Python (``backend_env``, ``backend_env.python``).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from edgefarm.errors import UsageError

FIRST_PARTY = ("agent", "edgefarm")  # the packages a trial child imports from the agent
PROBE_TIMEOUT_S = 120.0
_PROBE = (
    "import json, platform, sys\n"
    "from agent.backends import get_backend\n"
    "print(json.dumps({'version': get_backend(sys.argv[1]).installed_version(),"
    " 'python': platform.python_version(), 'prefix': sys.prefix}))\n"
)


@dataclass(frozen=True)
class BackendEnv:
    """A backend's environment: its folder and the interpreter in it."""

    backend: str
    path: Path
    python: Path


def parse_backend_envs(values: tuple[str, ...] | list[str]) -> dict[str, BackendEnv]:
    """``NAME=PATH`` values (a virtual environment's folder, or its Python) by backend;
    :class:`UsageError` naming the value for an unknown backend, a missing interpreter or a
    backend given twice."""
    from agent.backends import BACKENDS

    envs: dict[str, BackendEnv] = {}
    for value in values:
        name, sep, raw = value.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name or not raw:
            raise UsageError(f"--backend-env {value!r:.200}: expected NAME=PATH")
        if name not in BACKENDS:
            raise UsageError(
                f"--backend-env {value!r:.200}: unknown backend {name!r:.60} "
                f"(known: {', '.join(sorted(BACKENDS))})"
            )
        if name in envs:
            raise UsageError(f"--backend-env: backend {name!r} is given twice")
        envs[name] = BackendEnv(name, Path(raw).expanduser().absolute(), _interpreter(value, raw))
    return envs


def _interpreter(value: str, raw: str) -> Path:
    path = Path(raw).expanduser().absolute()
    candidates = (
        [path] if path.is_file() else [path / "bin" / "python", path / "Scripts" / "python.exe"]
    )
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise UsageError(
        f"--backend-env {value!r:.200}: no Python interpreter at {path} "
        "(give a virtual environment's folder or its bin/python)"
    )


@cache
def first_party_path() -> str:
    """A folder holding links to the agent's own packages (made once per process)."""
    folder = Path(tempfile.mkdtemp(prefix="edgefarm-pythonpath-"))
    root = Path(__file__).resolve().parent.parent
    for package in FIRST_PARTY:
        (folder / package).symlink_to(root / package, target_is_directory=True)
    return str(folder)


def env_child_environment(env: dict[str, str]) -> dict[str, str]:
    """A trial child's environment adapted to run in a backend environment: the agent's
    packages only on ``PYTHONPATH``, no virtualenv variables of the agent's own."""
    out = {k: v for k, v in env.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    out["PYTHONPATH"] = first_party_path()
    return out


def probe_env_backends(envs: dict[str, BackendEnv]) -> dict[str, dict[str, str]]:
    """Ask each environment's interpreter for its backend's version:
    ``{name: {"version", "python", "prefix"}}``. :class:`UsageError` when an environment
    cannot answer or lacks its backend's runtime."""
    found: dict[str, dict[str, str]] = {}
    for name, env in envs.items():
        where = f"--backend-env {name}={env.path}"
        try:
            done = subprocess.run(
                [str(env.python), "-c", _PROBE, name],
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT_S,
                env=env_child_environment(dict(os.environ)),
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as err:
            raise UsageError(f"{where}: its Python could not be run: {err}") from None
        try:
            answer = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            detail = " ".join(done.stderr.split())[-200:]
            raise UsageError(
                f"{where}: its Python could not tell the backend's version "
                f"({detail or 'no output'})"
            ) from None
        if not answer.get("version"):
            raise UsageError(
                f"--backend-env {name}={env.path}: the {name} backend's runtime is not "
                "installed in that environment"
            )
        found[name] = {k: str(answer[k]) for k in ("version", "python", "prefix")}
    return found
