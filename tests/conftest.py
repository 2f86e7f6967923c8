"""Shared test settings: where the real data lives.

Real data (../shared/data beside the repo; RLHF_JAX_DATA overrides the
directory) is optional for a user's clone -- tests that need it skip with the
reason -- but always present on CI (CI=true), where its absence fails.
"""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RLHF_JAX_DATA", REPO.parent / "shared" / "data"))
ON_CI = os.environ.get("CI", "").lower() == "true"


def shared_data_file(name: str) -> Path:
  """Path of a file in the shared data dir; skip (user clone) or fail (CI) if absent."""
  path = DATA / name
  if not path.is_file():
    if ON_CI:
      pytest.fail(f"{path} missing on CI (set RLHF_JAX_DATA to the shared data dir)")
    pytest.skip(f"{path} not found; set RLHF_JAX_DATA to the shared data directory")
  return path
