"""Training algorithms: sgd, downpour, sandblaster, sync."""

from .sgd import train_sgd

__all__ = ["train_sgd"]
