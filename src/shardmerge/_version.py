"""The release version, in one place (read by packaging, the CLI and the model card)."""

__version__ = "0.1.0"
