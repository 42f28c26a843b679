"""The ground floor: the typed config (config.py, the method sections in method_config.py), evaluation with
Many/Medium/Few groups, long-tail statistics, learning-rate schedules, the exit codes of failures and where
things are kept (storage.py: a local folder or object storage). Imports nothing else of glmc_ray."""
