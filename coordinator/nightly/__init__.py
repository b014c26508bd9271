"""Nightly regression runs: suites, baselines, interleaved measurement, confirmation."""
