"""Evaluation: per-domain score (accuracy, or mIoU for per-pixel labels), harmonic mean, error
barriers and loss surfaces."""
from .landscape import error_barrier, linear_path, loss_and_accuracy, loss_surface
from .metrics import accuracy, evaluate, harmonic_mean, is_dense, score

__all__ = ["accuracy", "error_barrier", "evaluate", "harmonic_mean", "is_dense", "linear_path", "loss_and_accuracy",
           "loss_surface", "score"]
