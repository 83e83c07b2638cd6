"""Inference: shards and engines."""
