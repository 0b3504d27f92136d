"""Benchmarks, one file each, run by `fvl bench NAME --json`."""
