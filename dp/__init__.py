"""Differential privacy: clipping, noise, accounting, per-peer budgets. Pure computation."""
