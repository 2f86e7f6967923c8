"""Sharded train step == single-device step, on 8 simulated CPU devices.

Runs tests/sharded_step_check.py in its own process (XLA_FLAGS must be set
before JAX starts).
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import xla_flags

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(*args):
  env = dict(os.environ, XLA_FLAGS=xla_flags(8),
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, os.path.join(HERE, "sharded_step_check.py"), *args],
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def by_accum():
  """One process for every check: no accumulation on three meshes, 2 micro-batches on one."""
  return _run("1", "8,1,1", "2,4,1", "2,2,2", "+", "2", "2,2,2")


@pytest.fixture(scope="module")
def results(by_accum):
  return by_accum["1"]


@pytest.mark.parametrize("mesh", ["(8, 1, 1)", "(2, 4, 1)", "(2, 2, 2)"])
def test_sharded_step_equals_single_device(results, mesh):
  r = results[mesh]
  assert results["(1, 1, 1)"]["param_change"] > 1e-4  # the step really updated the params
  assert r["loss_diff"] <= 1e-5, r
  assert abs(r["grad_norm"] - results["(1, 1, 1)"]["grad_norm"]) <= 1e-5, r
  assert r["max_param_diff"] <= 1e-5, r


def test_parameters_are_really_sharded(results):
  # q kernel: (layers, embed, heads, head_dim) -> (None, fsdp, tensor, None)
  assert results["(2, 2, 2)"]["q_kernel_spec"][1:3] == ["fsdp", "tensor"]
  assert results["(2, 4, 1)"]["embed_spec"] == ["tensor", "fsdp"]
  # optimizer state follows its parameter's layout (ZeRO-style)
  assert "fsdp" in results["(2, 4, 1)"]["adam_mu_first_leaf_spec"]
  # pure data parallelism replicates parameters; fsdp/tensor > 1 does not
  assert results["(8, 1, 1)"]["q_kernel_replicated"]
  assert not results["(2, 2, 2)"]["q_kernel_replicated"]


def test_sharded_step_with_gradient_accumulation(by_accum):
  r = by_accum["2"]
  for mesh in ["(2, 2, 2)"]:
    assert r[mesh]["max_param_diff"] <= 1e-5, r[mesh]
