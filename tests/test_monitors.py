"""Reward-hacking monitors (rlhf_jax/rollout.py) vs brute-force float64 references on
random inputs with ragged masks, plus the degenerate cases."""
import itertools

import numpy as np
import pytest

from rlhf_jax import rollout


def ref_repetition(tokens, mask, n):
  out = []
  for row, m in zip(tokens, mask):
    toks = [int(t) for t, k in zip(row, m) if k]
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    seen, repeats = set(), 0
    for g in grams:  # count n-grams that occurred earlier, one at a time
      repeats += g in seen
      seen.add(g)
    out.append(repeats / len(grams) if grams else 0.0)
  return np.asarray(out, np.float64)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_repetition_rate_matches_reference(n):
  rng = np.random.default_rng(n)
  tokens = rng.integers(0, 4, size=(32, 12))        # small vocab: many repeats
  lengths = rng.integers(0, 13, size=32)             # ragged, incl. empty
  mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
  np.testing.assert_allclose(rollout.repetition_rate(tokens, mask, n),
                             ref_repetition(tokens, mask, n), rtol=0, atol=1e-12)


def test_repetition_rate_degenerate_cases():
  t = np.array([[5, 5, 5, 5], [1, 2, 3, 4], [7, 0, 0, 0], [0, 0, 0, 0]])
  m = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_allclose(rollout.repetition_rate(t, m, 2), [2 / 3, 0.0, 0.0, 0.0])


def ref_disagreement(a, b, G):
  agree = disagree = 0
  for g in range(len(a) // G):
    for i, j in itertools.combinations(range(g * G, (g + 1) * G), 2):
      if a[i] == a[j] or b[i] == b[j]:
        continue
      if (a[i] > a[j]) == (b[i] > b[j]):
        agree += 1
      else:
        disagree += 1
  return None if agree + disagree == 0 else disagree / (agree + disagree)


@pytest.mark.parametrize("G", [2, 4, 8])
def test_order_disagreement_matches_reference(G):
  rng = np.random.default_rng(G)
  a = rng.integers(0, 3, size=8 * G).astype(np.float32)  # ties within groups
  b = (a + rng.normal(size=8 * G)).astype(np.float32)
  assert rollout.order_disagreement(a, b, G) == pytest.approx(ref_disagreement(a, b, G))


def test_order_disagreement_degenerate_cases():
  a = np.array([0.0, 1.0, 2.0, 3.0])
  assert rollout.order_disagreement(a, 2 * a, 4) == 0.0
  assert rollout.order_disagreement(a, -a, 4) == 1.0
  assert rollout.order_disagreement(np.ones(4), a, 4) is None  # a cannot tell any pair apart
  assert rollout.order_disagreement(a, a, 1) is None          # groups of one: no pairs


def test_hacking_monitors_keys_and_gap():
  B, G, P, C = 8, 4, 3, 5
  rng = np.random.default_rng(0)
  seq = rng.integers(0, 6, size=(B, P + C))
  cmask = (np.arange(C)[None] < rng.integers(1, C + 1, size=B)[:, None]).astype(np.int32)
  gold = rng.integers(0, 2, size=B).astype(np.float32)
  proxy = rng.normal(size=B).astype(np.float32)
  ro = rollout.Rollout(seq, None, cmask, None, None, None, gold + proxy,
                       {"gold": gold, "proxy": proxy}, cmask.sum(1), None, P, [], {})
  out = rollout.hacking_monitors(ro, G)
  assert out["repetition_rate"] == pytest.approx(ref_repetition(seq[:, P:], cmask, 2).mean())
  assert out["proxy_gold_gap"] == pytest.approx(float(proxy.mean() - gold.mean()))
  d = ref_disagreement(gold, proxy, G)
  assert out.get("reward_disagreement/gold_vs_proxy") == (None if d is None else pytest.approx(d))
