"""Parallelism as data: the rank grid (grid.py), the split rules and the sync points they imply
(plan.py), and the layers that run a rank's share of the model (layers.py)."""
