"""What a run leaves and how it is found again: its directory (rundir.py: checkpoints, metrics.jsonl,
final.json, the in-process Reporter), the code that made it (provenance.py), TensorBoard events, per-class
plots, its copy on object storage (mirror.py), a Ray Train run's checkpoints (ray_resume.py), the parent run
a second stage or a teacher starts from (parent_run.py), and the comparison of finished runs (comparison.py)."""
