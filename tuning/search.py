"""The search's command line: `python tuning/search.py --help` (also `python -m glmc_ray.search`).

The command is glmc_ray/search/cli.py; the search itself glmc_ray/search/ (trials.py, space.py, full.py).
"""
import sys

from glmc_ray.search.cli import main

if __name__ == "__main__":
    sys.exit(main())
