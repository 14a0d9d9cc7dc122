"""Carrying out a plan: passes over the base, tensor merging, the arithmetic, the writer threads."""
