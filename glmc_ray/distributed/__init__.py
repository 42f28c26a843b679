"""The loop on Ray Train: one function launches a run on N workers over any number of nodes (ray_train.py:
`launch`, reporting, restarts and resume), Ray's own logging kept off the console (ray_logging.py), and a
two-node local cluster for trying multi-node runs on one machine (local_cluster.py)."""
