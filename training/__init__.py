"""Training: the job (run.py), the loop (loop.py), checkpoints and the weight average."""
