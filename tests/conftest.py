"""Shared pytest setup. Test helpers live in tests/support (imported as ``support``)."""
