"""One file per extension point, each registering a new part without touching the project:
a tower type, a gate, an estimator and a data source (used by tests/test_extension.py)."""
