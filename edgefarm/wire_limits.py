"""Bounds on what crosses the wire and what a spec may ask for: named once, here.

The coordinator refuses agent messages beyond these (``coordinator.validation``),
campaign specs cannot ask for measurements whose results would exceed them
(``coordinator.spec``), and the coordinator tells every agent the figures in
``RegisterResponse.limits``. The .proto comments quote the same numbers; a test
keeps them in step.
"""

from __future__ import annotations

# gRPC messages (either direction) larger than this are refused by the transport.
MAX_MESSAGE_BYTES = 24 << 20
# One TaskResult: trials, samples per trial, samples over all trials.
MAX_TRIALS = 100
MAX_SAMPLES_PER_TRIAL = 1_000_000
MAX_SAMPLES_PER_RESULT = 2_000_000
# Trial.serving: load levels of one serving trial, and distinct errors kept per level.
MAX_SERVING_LEVELS = 64
MAX_SERVING_ERRORS = 16
# Any one string field (names, error messages, map keys and values).
MAX_STRING_BYTES = 65_536
# Entries of any one map (labels, environment, metrics, accuracy, options).
MAX_MAP_ENTRIES = 256
# Entries of any one repeated string field (e.g. cpu_flags).
MAX_LIST_ENTRIES = 4096
# TaskResult.example_outcomes: one byte per eval example.
MAX_EXAMPLE_OUTCOMES = 1_000_000
# Agent names and device ids.
MAX_NAME_BYTES = 128

# Campaign specs: what the store and the wire can carry.
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_DEPTH = 32  # nesting of mappings and lists
MAX_SPEC_NODES = 100_000  # values after alias expansion
MAX_UINT32 = 2**32 - 1
MAX_INT64 = 2**63 - 1

# Liveness, designed together: an agent retries a lost connection after at most
# MAX_RECONNECT_DELAY_S (jittered exponential backoff), so a restarted coordinator keeps
# every lease it restores for a lease period plus that long.
MAX_RECONNECT_DELAY_S = 30.0
# An agent whose last heartbeat is older than this many heartbeat intervals gets no work.
SILENT_AFTER_HEARTBEATS = 3
# How long `campaign run` / `campaign watch` keep re-attaching to a coordinator that
# went away (e.g. to restart) before giving up.
REATTACH_TIMEOUT_S = 600.0
