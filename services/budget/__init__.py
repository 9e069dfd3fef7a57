"""Budgets: per-period spending limits, reserved atomically before every spend."""
