"""experiments/throughput/compare.py: the table of medians, spreads and per-round ratios."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments", "throughput"))
import compare  # noqa: E402


def _run(rnd, lib, w, s):
  return dict(round=rnd, library=lib, workload=w, result={"seconds_per_step": s,
                                                         "tokens_per_s": 100 / s})


def test_render_uses_the_median_of_per_round_ratios_with_spread():
  runs = [_run(0, "ours", "sft", 1.0), _run(0, "trl", "sft", 1.5), _run(0, "tunix", "sft", 1.2),
          _run(1, "ours", "sft", 2.0), _run(1, "trl", "sft", 2.2), _run(1, "tunix", "sft", 4.0),
          _run(2, "ours", "sft", 1.0), _run(2, "trl", "sft", 1.3), _run(2, "tunix", "sft", 1.6)]
  table, verdict = compare.render(runs, ["sft"], ["trl", "tunix"], [])
  row = table.splitlines()[2]
  # ours: median 1.0 over rounds (spread 1.0-2.0); ratios trl 1.5, 1.1, 1.3 -> 1.30x
  assert "| sft | 1.000 (1.000-2.000) |" in row
  assert "**1.30x** (1.10x-1.50x)" in row
  # tunix 1.2, 2.0, 1.6 -> 1.60x: meets 1.5x; trl 1.30x meets 1.2x
  assert "**1.60x** (1.20x-2.00x)" in row
  assert verdict == [True, True]
  runs[1]["result"]["seconds_per_step"] = 1.1      # trl round 0: 1.1x -> median 1.1x
  _, verdict = compare.render(runs, ["sft"], ["trl", "tunix"], [])
  assert verdict == [False, True]


def test_render_reports_a_failed_run():
  runs = [_run(0, "ours", "dpo", 1.0), dict(round=0, library="trl", workload="dpo",
                                            result={"error": "boom"})]
  table, verdict = compare.render(runs, ["dpo"], ["trl"], [])
  assert "| dpo | 1.000 |" in table and "n/a" in table
  assert verdict == []
