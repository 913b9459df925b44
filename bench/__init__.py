"""The performance bench: ``python -m bench`` (see docs/performance.md)."""
