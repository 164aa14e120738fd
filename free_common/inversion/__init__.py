"""Inversion: generator, meta-generator and the losses that recover tasks from teachers."""
