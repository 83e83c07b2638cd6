"""Helpers shared by the test suites: fake nodes, hubs and discoveries, real clusters over loopback."""
