"""Shared pytest set-up: tests/ is importable (framework_passes, model_builders)."""
