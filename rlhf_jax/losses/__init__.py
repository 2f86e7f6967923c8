"""Losses: pure functions of arrays returning (loss, metrics)."""
