"""Conversion processes keep OpenVINO's and NNCF's usage telemetry off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openvino_telemetry")

REPO = Path(__file__).resolve().parents[2]

# Run where pytest is not imported (NNCF silences itself under pytest) and no CI
# variable is set, with a fresh home: no consent file, the library's default.
SCRIPT = """
import nncf  # makes the telemetry singleton, as an earlier import would
import openvino_telemetry

from coordinator.conversion.telemetry import decline_openvino_telemetry

def consent_after_init():
    made = openvino_telemetry.Telemetry()
    # what ov.convert_model does on every call: read the consent again
    made.init(app_name="probe", app_version="0", tid="probe", backend="ga4",
              enable_opt_in_dialog=False, disable_in_ci=True)
    return made.consent

print("default", openvino_telemetry.Telemetry().consent, consent_after_init())
decline_openvino_telemetry()
print("declined", openvino_telemetry.Telemetry().consent, consent_after_init())
"""


def test_consent_is_declined_for_the_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"CI", "NNCF_CI", "NNCF_DEV"}}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "default True True" in lines  # the library's own default: it would send
    assert "declined False False" in lines
