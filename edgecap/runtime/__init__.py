"""Torch-free runtime: vocabulary, preprocessing, search, engines, sources."""
