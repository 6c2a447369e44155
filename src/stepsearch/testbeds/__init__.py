"""Exact test beds and the bundled digits model."""
