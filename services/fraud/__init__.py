"""Fraud scoring: every payment is scored before it completes."""
