"""Optimizer, train state, pure steps and the training loop."""
