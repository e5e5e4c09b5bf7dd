"""``python -m sims.study``."""

import sys

from sims.cli import run_command
from sims.study.cli import main

if __name__ == "__main__":
    sys.exit(run_command(main, None, "sims.study"))
