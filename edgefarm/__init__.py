"""edgefarm: a distributed benchmark farm for edge AI.

This package holds the small shared kernel used by every role: the domain model,
the error hierarchy, the home directory and the command line. It must stay light:
the agent imports it, so nothing here may import ray, sqlalchemy or a backend.
"""

__version__ = "0.1.0"

# Bumped whenever agent <-> coordinator messages change incompatibly.
PROTOCOL_VERSION = 2
