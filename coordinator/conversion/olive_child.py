"""The process an Olive conversion runs in: Olive's CLI in-process, offline by force.

``python -m coordinator.conversion.olive_child NETWORK_LOG ARG...`` runs
``olive ARG...`` (``olive.cli.launcher.main``) after two things that keep it off the
network, whatever Olive's own switches do:

- **Olive's telemetry replaced.** ``olive.telemetry`` is put into ``sys.modules`` as a
  stub before anything imports Olive: Olive 0.13 queues a heartbeat to its collector
  (``mobile.events.data.microsoft.com``) in ``Telemetry.__init__`` before it reads
  ``--disable_telemetry`` or ``OLIVE_DISABLE_TELEMETRY``, and a background thread sends it
  a second later. With the stub no exporter, thread or device-id file is ever made.
- **A network guard.** A :func:`sys.addaudithook` hook refuses every name lookup
  (``socket.getaddrinfo``, ``gethostbyname``, ...) and every connect or send on a
  non-Unix socket, and appends one line per attempt (event and target) to
  ``NETWORK_LOG``. The parent fails the step when that file is not empty, so an Olive
  pass that wants a hub model or dataset fails its variant with the reason instead of
  reaching out. (The hook sees what Python code does; Olive and its passes are Python.)

Exit status: Olive's (0 when its ``main`` returns). An Olive exception is printed as
``olive error: TYPE: MESSAGE`` as the last line of stderr, for the parent to quote.
"""

from __future__ import annotations

import socket
import sys
import types
from pathlib import Path
from typing import Any

STUBBED = "olive.telemetry"
_LOOKUPS = frozenset(
    {
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyname_ex",
        "socket.gethostbyaddr",
        "socket.getnameinfo",
    }
)
_SENDS = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg"})


class _NoTelemetry:
    """Olive's ``Telemetry`` with every method a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def stub_telemetry() -> None:
    """Put a do-nothing ``olive.telemetry`` in place (before Olive is imported)."""
    stub = types.ModuleType(STUBBED)
    stub.Telemetry = _NoTelemetry  # type: ignore[attr-defined]
    stub.action = lambda function: function  # type: ignore[attr-defined]
    stub.__all__ = ["Telemetry", "action"]  # type: ignore[attr-defined]
    sys.modules[STUBBED] = stub


def guard_network(log_path: Path) -> None:
    """Refuse and log every name lookup and every non-Unix connect or send from now on."""
    log = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - process-long

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event in _LOOKUPS:
            target = str(args[0]) if args else ""
        elif event in _SENDS:
            sock = args[0] if args else None
            if getattr(sock, "family", None) == socket.AF_UNIX:
                return
            target = str(args[1]) if len(args) > 1 else ""
        else:
            return
        log.write(f"{event} {target}\n")
        raise PermissionError(f"edgefarm: no network for Olive steps ({event} {target})")

    sys.addaudithook(hook)


def main(argv: list[str]) -> int:
    """Run ``olive argv[1:]`` under the guard, logging attempts to ``argv[0]``."""
    if len(argv) < 2:
        print("usage: olive_child NETWORK_LOG OLIVE_ARG...", file=sys.stderr)
        return 2
    guard_network(Path(argv[0]))
    if "--real-telemetry" in argv:  # for the test that shows the guard sees Olive's heartbeat
        argv = [a for a in argv if a != "--real-telemetry"]
    else:
        stub_telemetry()
    try:
        from olive.cli.launcher import main as olive_main

        olive_main(argv[1:], called_as_console_script=False)
    except SystemExit as stop:
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Exception as err:  # Olive's own failures, quoted by the parent
        message = " ".join(str(err).split())
        print(f"olive error: {type(err).__name__}: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
