"""experiments/bitwise/compare_checkouts.py covers every variant the library has, and its
comparison notices a changed metric or checkpoint leaf."""
import importlib.util
import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
  spec = importlib.util.spec_from_file_location(
      "compare_checkouts", os.path.join(ROOT, "experiments/bitwise/compare_checkouts.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_cells_cover_every_dpo_loss_and_grpo_variant():
  from rlhf_jax.losses.dpo import LOSS_TYPES
  from rlhf_jax.trainers.grpo import VARIANTS
  cells = _tool().cells(3)
  assert {f"dpo_{x}" for x in LOSS_TYPES} <= set(cells)
  assert {f"grpo_{x}" for x in VARIANTS} <= set(cells)
  assert {"sft", "rm", "prm", "ppo", "lora_sft", "lora_dpo"} <= set(cells)
  assert all(o["num_steps"] == 3 for _, o in cells.values())


def test_metric_rows_drop_only_wall_clock_keys(tmp_path):
  rows = [{"step": 1, "loss": 0.5, "elapsed_s": 3.2, "time/step": 0.1,
           "rollout_tokens_per_second": 9.0}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  assert _tool().metric_rows(str(tmp_path)) == [{"step": 1, "loss": 0.5}]
  assert _tool().metric_rows(str(tmp_path), ("lo",)) == [{"step": 1}]  # --added lo


def test_trees_equal_is_bitwise():
  tool = _tool()
  a = {"p": np.array([1.0, 2.0], np.float32)}
  assert tool.kr.trees_equal(a, {"p": np.array([1.0, 2.0], np.float32)})
  assert not tool.kr.trees_equal(a, {"p": np.array([1.0, np.nextafter(np.float32(2), 3)],
                                                   np.float32)})
  assert not tool.kr.trees_equal(a, {"p": np.array([1.0, 2.0], np.float64)})


def test_key_map_renames_only_matching_prefixes():
  tool = _tool()
  before = {"['opt_state'][0]['mu']": 1, "['loop']['bad_run']": 2, "['params']['w']": 3}
  key_map = [("['opt_state'][", "['opt_state']['inner']["), ("['loop']", "['opt_state']")]
  assert tool.rename_leaves(before, key_map) == {"['opt_state']['inner'][0]['mu']": 1,
                                                 "['opt_state']['bad_run']": 2,
                                                 "['params']['w']": 3}
  assert tool.rename_leaves(before, []) == before
