"""Helpers for tests and the quick start: tiny models of every family, sample text."""
