"""Benchmarks: each figure is a ratio of two systems measured in the same run (see BENCHMARKS.md)."""
