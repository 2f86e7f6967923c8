"""Process reward model (PRM): per-step correctness on real GSM8K step labels.

Lightman et al. 2023 ("Let's Verify Step by Step"); Uesato et al. 2022 ("Solving
math word problems with process- and outcome-based feedback"). Step labels come
from checking GSM8K's calculator annotations `<<48/2=24>>` plus a corrupted copy
of every solution (rlhf_jax/data/prm.py); the trainer is rlhf_jax/trainers/prm.py.

Presets (`--config=configs/prm.py:PRESET`):
  tiny   the tiny CPU model (4 layers, d=96) on the first 2000 GSM8K train solutions
         (+ corrupted copies), evaluated on the first 300 GSM8K test solutions; a
         256-token BPE trained on the data; rows of <= 128 tokens (prompt LEFT-truncated
         to 32); batch 16, 250 steps; a few minutes on 2 shared CPU cores.
Data files: $RLHF_JAX_DATA (default ../shared/data beside the repo)/gsm8k_{train,test}.jsonl;
override with --config.data.train_path / eval_path.
"""
import os

from ml_collections import ConfigDict

from rlhf_jax.config import base_config

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("RLHF_JAX_DATA", os.path.join(os.path.dirname(_REPO), "shared", "data"))


def get_config(preset: str = "tiny") -> ConfigDict:
  c = base_config("prm")
  for k in ("eval_kl", "eval_samples", "eval_seed", "eval_reward_spec", "capability",
            "sample"):  # policy-evaluation keys: a PRM does not generate
    if k in c:
      del c[k]
  c.prm = ConfigDict(dict(
      negative_weight=4.0,     # loss weight of wrong steps (the minority class, ~1 in 6)
  ))
  if preset != "tiny":
    raise ValueError(f"unknown prm preset {preset!r}; expected tiny")
  c.data.update(train_path=os.path.join(DATA, "gsm8k_train.jsonl"),
                eval_path=os.path.join(DATA, "gsm8k_test.jsonl"),
                max_train_examples=2000, max_eval_examples=300,
                max_prompt_len=32, max_len=128)
  c.tokenizer.vocab_size = 256
  c.model.max_seq_len = 128
  c.batch_size = 16
  c.num_steps = 250
  c.optimizer.update(lr=2e-3, warmup_steps=30)
  c.log_every = 20
  c.eval_every = 125
  return c
