"""Bytes on disk: checkpoint formats, read and written without loading tensors whole."""
