"""Training, unaware of who wraps it: the loop (loop.py: `fit` over a data source with `.epoch(e)` and `len()`,
metrics and checkpoints out through a Reporter) and one worker's assembly from a config (worker.py:
`run_worker` builds the data, the network, the method and the optimiser, then fits)."""
