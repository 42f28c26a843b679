"""`python -m glmc_ray.search`: the same command as `python tuning/search.py`."""
import sys

from glmc_ray.search.cli import main

sys.exit(main())
