"""Benchmarks for edgefleet: `python -m bench` (or `make bench`); see BENCHMARKS.md.

Each benchmark is a module with `run(args) -> list[Table]` (and, optionally,
`add_arguments(parser)`), registered by name in `bench.__main__.BENCHMARKS`.
"""
