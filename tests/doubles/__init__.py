"""Test doubles of third-party clients (put this folder first on PYTHONPATH to swap them in)."""
