"""Data: synthetic tasks, file readers with row-level validation, batching with grain."""
