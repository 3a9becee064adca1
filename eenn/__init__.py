"""eenn: early-exit neural networks with PyTorch Lightning + Hydra."""

__version__ = "0.1.0"
