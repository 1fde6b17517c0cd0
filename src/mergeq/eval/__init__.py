"""Evaluation: per-domain accuracy, harmonic mean, and (later) barriers and surfaces."""
from .metrics import accuracy, evaluate, harmonic_mean

__all__ = ["accuracy", "evaluate", "harmonic_mean"]
