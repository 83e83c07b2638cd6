"""Test support: synthetic models with real architectures and seeded random weights."""
