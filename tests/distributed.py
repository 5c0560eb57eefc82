"""The multi-process helper of the tests is the package's own harness (allreduce_rms.launch):
kept importable here for scripts that put tests/ on sys.path (benchmarks/reliability.py)."""

from allreduce_rms.launch import EXIT_TIMEOUT, RanksFailed, free_port, run_ranks, send  # noqa: F401
