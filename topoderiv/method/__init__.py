"""The method: admissible activations, the sensitivity statistics and their solution, the rules."""
from . import activations, rules, statistic  # noqa: F401
