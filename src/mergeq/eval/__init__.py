"""Evaluation: per-domain accuracy, harmonic mean, error barriers and loss surfaces."""
from .landscape import error_barrier, linear_path, loss_and_accuracy, loss_surface
from .metrics import accuracy, evaluate, harmonic_mean

__all__ = ["accuracy", "error_barrier", "evaluate", "harmonic_mean", "linear_path", "loss_and_accuracy",
           "loss_surface"]
