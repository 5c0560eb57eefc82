"""``python -m allreduce_rms``: the correctness check and benchmark (see :mod:`allreduce_rms.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":  # spawned ranks import this module as __mp_main__: run nothing then
    sys.exit(main())
