"""Multi-process helpers of the tests. Ranks as functions: the package's own harness
(allreduce_rms.launch), re-exported for scripts that put tests/ on sys.path
(benchmarks/reliability.py). Ranks as whole scripts in fresh interpreters (a rank that must
not import numpy, or must see one GPU only): run_script_ranks below."""

from allreduce_rms.launch import EXIT_TIMEOUT, RanksFailed, free_port, run_ranks, send  # noqa: F401


def run_script_ranks(script, world_size: int, per_rank_env=None, timeout: float = 120.0):
    """Run `script` as `world_size` plain Python processes that join one process group through
    env:// (RANK, WORLD_SIZE, MASTER_ADDR/PORT set here; per_rank_env(rank) adds variables of
    its own), and return each rank's (exit code, combined output). A rank that does not finish
    within `timeout` kills them all and fails the test: a hang is a failure, never a wait."""
    import os
    import subprocess
    import sys

    import pytest

    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world_size)}
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**base, "RANK": str(r), **(per_rank_env(r) if per_rank_env else {})})
             for r in range(world_size)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank of {script} did not finish within {timeout:.0f} s")
    return [(p.returncode, out) for p, out in zip(procs, outputs)]
