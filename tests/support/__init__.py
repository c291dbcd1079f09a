"""Helpers shared by tests of several layers (import as ``tests.support.<module>``)."""
