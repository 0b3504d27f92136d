"""Pipelines: library functions that the CLI, the demo, the report, the app and the notebooks share."""
