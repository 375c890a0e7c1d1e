"""Selfie: self-supervised pretraining for image embedding (Trinh, Luong, Le 2019)."""

__version__ = "0.1.0"
