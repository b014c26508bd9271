"""Keeping OpenVINO's and NNCF's usage telemetry off in conversion processes.

``openvino_telemetry`` (used by ``ov.convert_model`` and by NNCF) sends anonymous usage
events to Google Analytics unless the user opted out with ``opt_in_out --opt_out``.
The farm makes no network calls at run time, so conversion processes answer the
library's consent check with "declined" for themselves; the user's own consent file
is neither read nor changed.
"""

from __future__ import annotations

from typing import Any


def decline_openvino_telemetry() -> None:
    """Make every ``openvino_telemetry`` consent check in this process say "declined"."""
    try:
        from openvino_telemetry import Telemetry
        from openvino_telemetry.utils import opt_in_checker
    except ImportError:  # the openvino extra is not installed: nothing to silence
        return

    declined = opt_in_checker.ConsentCheckResult.DECLINED

    def check(_self: Any, *_args: Any, **_kwargs: Any) -> Any:
        return declined

    opt_in_checker.OptInChecker.check = check  # type: ignore[method-assign]
    # The telemetry object is a per-process singleton: one made before this call
    # (an earlier ``import nncf``) keeps the consent it read, so withdraw it too.
    made = getattr(Telemetry, "_SingletonMetaClass__single_instance", None)
    if made is not None:
        made.consent = False
