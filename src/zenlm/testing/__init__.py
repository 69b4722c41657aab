"""Helpers for zenlm's own tests (multi-process gloo harness). Importable, not a test module."""
