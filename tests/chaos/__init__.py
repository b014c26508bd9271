"""Chaos tests: real coordinator and agent processes on loopback, a TCP proxy of the
tests' own between an agent and the coordinator, kills and restarts."""
