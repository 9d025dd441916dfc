"""Converters from other checkpoint formats into transformers models (see ctranslate2.py)."""
