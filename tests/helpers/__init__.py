"""Helpers and fixtures the tests share (imported as `helpers.<module>`; tests/ is on sys.path)."""
