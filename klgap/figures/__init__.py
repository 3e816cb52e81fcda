"""Figures drawn from saved data on plain matplotlib Figures: a run's (runs.py), curves and ratio comparisons
(curves.py), a study over SAE checkpoints (training.py), and the look they share (style.py)."""
