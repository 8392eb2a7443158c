"""Training: the loop (loop.py), checkpoints, the weight average and the torchrun plumbing."""
