"""Benchmarks: the supervisor against raw Unicorn, measured in the same run.

``python -m benchmarks [--quick] [--loop asyncio|uvloop|both] [--json PATH] [--only NAME]``
prints a table and writes JSON.  See docs/performance.md.
"""
