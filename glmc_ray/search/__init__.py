"""Hyper-parameter and method search: the space (space.py) and its file (space_file.py), the options and their
checks (options.py), what is maximised (objectives.py; pareto.py for several at once), Ray Tune trials proposed
by Optuna (trials.py), the full-schedule stages after a search (full.py) and the command line (cli.py:
`python tuning/search.py` or `python -m glmc_ray.search`)."""
