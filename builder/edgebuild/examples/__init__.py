"""Embedded example models (the default `edgebuild pack` model)."""
