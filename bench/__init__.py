"""Benchmarks, run from the project's root as modules (``python -m bench.stopping``); their figures go
to ``bench/RESULTS.md`` with the machine, the date and the command."""
