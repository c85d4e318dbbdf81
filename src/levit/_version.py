"""The package version, at the bottom of the import graph (read by ``__init__``, the CLI and file metadata)."""

__version__ = "0.1.0"
