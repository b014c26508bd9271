"""Nightly regression detection: pure statistics over plain series (no store, no I/O)."""
