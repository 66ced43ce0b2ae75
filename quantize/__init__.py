"""Trained ternary quantization (TTQ) of fully connected layers."""
