"""Experiments: built-in tasks, comparisons of growth methods and baselines, plots."""
