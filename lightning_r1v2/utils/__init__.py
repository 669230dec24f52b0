"""Plumbing shared by the stages: checkpoint I/O, RNG state, interrupts."""
