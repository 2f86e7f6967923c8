"""The bad-input corpus (issue #9): malformed configs, data files, checkpoints and
pretrained files, each driven through the real `rlhf-jax` command line.

Every case in CASES must
  * exit non-zero: 2 for usage / config errors, 1 for errors found while running
    (data, checkpoints, pretrained files);
  * print exactly one `error: ...` line that names the key / file:line / tensor and
    what was expected (the case's `expect` substrings), and no traceback;
  * log no other error, and leave the files already in the workdir byte-identical
    (sha256 before and after) and add none (a TFDS data cache under WORKDIR/tfds/, which
    later runs reuse, may have been built before a row of the data was found bad).

Cases run in-process (`rlhf_jax.launch.cli`, SystemExit caught); `test_exit_status_*`
run a few as real processes. The README's "Troubleshooting" section lists the groups;
`python tests/test_bad_inputs.py` prints the counts per category and group.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest

from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Case:
  category: str                 # config | data | checkpoint | pretrained
  group: str                    # sub-group (README table)
  name: str
  argv: tuple                   # command line after `rlhf-jax`; {placeholders} filled per case
  expect: tuple                 # substrings of the error line (placeholders filled)
  code: int                     # expected exit status
  setup: Callable | None = None  # setup(tmp, env): writes the bad input, may add to env
  workdir: str = "prior"        # prior: a fake earlier run's files; run: a copy of a real run
  devices: int = 1              # > 1: run only as a process with that many CPU devices

  @property
  def id(self):
    return f"{self.category}/{self.group}/{self.name}"


CASES: list[Case] = []
PRESETS = {"sft": "configs/sft.py:tiny", "rm": "configs/rm.py:tiny", "dpo": "configs/dpo.py:tiny",
           "grpo": "configs/grpo.py:tiny", "ppo": "configs/ppo.py:tiny",
           "prm": "configs/prm.py:tiny"}


def add(category, group, name, argv, expect, code, setup=None, workdir="prior", devices=1):
  CASES.append(Case(category, group, name, tuple(argv),
                    (expect,) if isinstance(expect, str) else tuple(expect), code, setup,
                    workdir, devices))


def train(trainer, *args):
  return ("train", f"--config={PRESETS[trainer]}", "--workdir={wd}", *args)


# Small model of the real run the checkpoint cases resume / start from (fast to build).
SMALL = ("--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.n_heads=2",
         "--config.model.n_kv_heads=1", "--config.model.head_dim=16", "--config.model.d_ff=64")
SFT_OK = ("--config.tokenizer.path={tok}", "--config.data.train_path={sft}",
          "--config.data.max_seq_len=64", "--config.batch_size=8")
RUN = (*SMALL, *SFT_OK, "--config.num_steps=2", "--config.optimizer.warmup_steps=0",
       "--config.eval_every=0", "--config.sample.every=0", "--config.eval_kl=False",
       "--config.checkpoint.async_save=False")


# ----------------------------------------------------------------------------
# Setup helpers: write the bad input under the case's tmp dir
# ----------------------------------------------------------------------------

def lines(*rows, name="bad.jsonl", key="bad"):
  """setup writing `rows` (dict -> JSON, str -> text, bytes -> raw) one per line."""
  def setup(tmp, env):
    path = os.path.join(tmp, name)
    with open(path, "wb") as f:
      for r in rows:
        b = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
        f.write(b + b"\n")
    env[key] = path
  return setup


def raw(data: bytes, name="bad.jsonl", key="bad"):
  def setup(tmp, env):
    path = os.path.join(tmp, name)
    with open(path, "wb") as f:
      f.write(data)
    env[key] = path
  return setup


def both(*setups):
  def setup(tmp, env):
    for s in setups:
      s(tmp, env)
  return setup


OK_SFT = {"prompt": "reverse: abc", "completion": "cba"}
OK_PAIR = {"prompt": "reverse: abc", "chosen": "cba", "rejected": "bca"}
OK_PROMPT = {"prompt": "add: 1+2", "answer": "3"}
OK_PRM = {"prompt": "1+2*3?", "steps": ["2*3=6", "1+6=7"], "labels": [1, 1]}

# ============================================================================
# config: unknown keys
# ============================================================================
for trainer, key, hint in [
    ("sft", "model.d_modle", "model.d_model"), ("sft", "num_step", "num_steps"),
    ("sft", "data.packng", "data.packing"), ("sft", "checkpoint.evry", "checkpoint.every"),
    ("sft", "mesh.shapes", "mesh.shape"), ("sft", "lora.rnk", "lora.rank"),
    ("sft", "tokenizer.paht", "tokenizer.path"), ("sft", "optimizer.warmup", "optimizer.warmup_steps"),
    ("sft", "data.max_seq_length", "data.max_seq_len"),
    ("dpo", "dpo.losstype", "dpo.loss_type"), ("dpo", "dpo.bta", "dpo.beta"),
    ("grpo", "grpo.varient", "grpo.variant"), ("grpo", "rollout.groupsize", "rollout.group_size"),
    ("ppo", "ppo.critc", "ppo.critic"), ("rm", "rm.center", "rm.center_coef"),
    ("prm", "data.maxlen", "data.max_len"),
]:
  add("config", "unknown key", f"{trainer}:{key}", train(trainer, f"--config.{key}=1"),
      [f"unknown config key 'config.{key}'", f"did you mean --config.{hint}?"], 2)
for trainer, key in [("sft", "grpo.variant"), ("sft", "data.max_prompt_len"), ("sft", "zzz"),
                     ("dpo", "rollout.group_size"), ("grpo", "dpo.beta"),
                     ("sft", "optimizer.lr.value")]:
  add("config", "unknown key", f"{trainer}:{key}", train(trainer, f"--config.{key}=1"),
      f"unknown config key 'config.{key}'", 2)

# ============================================================================
# config: wrong types (the value cannot be parsed as the key's type)
# ============================================================================
for trainer, key, value, want in [
    ("sft", "num_steps", "abc", "int"), ("sft", "batch_size", "1.5", "int"),
    ("sft", "optimizer.lr", "fast", "float"), ("sft", "data.packing", "maybe", "bool"),
    ("sft", "seed", "x", "int"), ("sft", "model.d_model", "1e3", "int"),
    ("sft", "lora.rank", "two", "int"), ("sft", "checkpoint.keep", "3.5", "int"),
    ("sft", "num_steps", "True", "int"), ("sft", "tokenizer.vocab_size", "big", "int"),
    ("sft", "eval_every", "", "int"), ("sft", "optimizer", "3", "section"),
    ("sft", "optimizer.lr", "[1]", "float"), ("dpo", "dpo.beta", "high", "float"),
    ("dpo", "dpo.reference_free", "2", "bool"), ("grpo", "rollout.group_size", "eight", "int"),
    ("grpo", "rollout.temperature", "hot", "float"), ("ppo", "ppo.gamma", "one", "float"),
    ("sft", "eval_at_start", "maybe", "bool"), ("dpo", "eval_at_end", "2", "bool"),
    ("grpo", "rollout.stop_at_eos", "maybe", "bool"),
    ("grpo", "rollout.is_cap", "big", "float"),
    ("grpo", "rollout.max_staleness", "1.5", "int"),
    ("dpo", "data.pad_multiple", "eight", "int"),
]:
  add("config", "wrong type", f"{trainer}:{key}={value}",
      train(trainer, f"--config.{key}={value}"), [f"config.{key}", f"expected {want}"], 2)
for key, value, expect in [
    ("mesh.shape", "abc", "config.mesh.shape"), ("mesh.shape", "(1,2)", "config.mesh.shape"),
    ("model.rope_scaling", "(8.0,1.0)", "config.model.rope_scaling"),
    ("data.overlength", "5", "config.data.overlength"),
    ("model.n_heads", "None", "config.model.n_heads"),
]:
  add("config", "wrong type", f"sft:{key}={value}", train("sft", f"--config.{key}={value}"),
      expect, 2)

# ============================================================================
# config: out-of-range values
# ============================================================================
for trainer, args, expect in [
    ("sft", ["num_steps=0"], "config.num_steps: must be > 0"),
    ("sft", ["num_steps=-5"], "config.num_steps: must be > 0, got -5"),
    ("sft", ["batch_size=0"], "config.batch_size: must be > 0"),
    ("sft", ["batch_size=-8"], "config.batch_size: must be > 0"),
    ("sft", ["grad_accum_steps=0"], "config.grad_accum_steps: must be >= 1"),
    ("sft", ["optimizer.lr=-0.001"], "config.optimizer.lr: must be > 0"),
    ("sft", ["optimizer.lr=0"], "config.optimizer.lr: must be > 0"),
    ("sft", ["optimizer.lr=nan"], "config.optimizer.lr: must be"),
    ("sft", ["optimizer.lr=inf"], "config.optimizer.lr: must be"),
    ("sft", ["optimizer.warmup_steps=-1"], "config.optimizer.warmup_steps"),
    ("sft", ["optimizer.warmup_steps=1000"], "config.optimizer.warmup_steps"),
    ("sft", ["optimizer.final_lr_ratio=-0.5"], "config.optimizer.final_lr_ratio"),
    ("sft", ["optimizer.b1=1.5"], "config.optimizer.b1"),
    ("sft", ["optimizer.b2=-0.1"], "config.optimizer.b2"),
    ("sft", ["optimizer.eps=-1e-8"], "config.optimizer.eps"),
    ("sft", ["optimizer.weight_decay=-0.01"], "config.optimizer.weight_decay"),
    ("sft", ["optimizer.grad_clip_norm=-1.0"], "config.optimizer.grad_clip_norm"),
    ("sft", ["log_every=0"], "config.log_every: must be > 0"),
    ("sft", ["eval_every=-1"], "config.eval_every"),
    ("sft", ["eval_batches=0"], "config.eval_batches"),
    ("sft", ["checkpoint.keep=0"], "config.checkpoint.keep: must be >= 1"),
    ("sft", ["checkpoint.every=-5"], "config.checkpoint.every"),
    ("sft", ["max_bad_steps=-1"], "config.max_bad_steps"),
    ("sft", ["seed=-1"], "config.seed"),
    ("sft", ["data.max_seq_len=2"], "config.data.max_seq_len: must be >= 4"),
    ("sft", ["data.overlength=clip"], "config.data.overlength: expected error|truncate|drop"),
    ("sft", ["data.synthetic_task=mul"], "config.data.synthetic_task"),
    ("sft", ["data.synthetic_max_len=0"], "config.data.synthetic_max_len"),
    ("sft", ["data.source=csv"], ["config.data.source='csv'", "gsm8k_tools"]),
    ("sft", ["data.synthetic_digits=0", "--config.data.synthetic_task=guess_number"],
     "config.data.synthetic_digits"),
    ("sft", ["tokenizer.chat_style=xml"], "config.tokenizer.chat_style"),
    ("sft", ["tokenizer.model_type=wordpiece"], "config.tokenizer.model_type"),
    ("sft", ["tokenizer.vocab_size=2"], "config.tokenizer.vocab_size"),
    ("sft", ["model.n_heads=5"], "model.n_heads=5 must be a multiple of"),
    ("sft", ["model.head_dim=15"], "model.head_dim=15 must be even"),
    ("sft", ["model.activation=relu"], "model.activation='relu'"),
    ("sft", ["model.dtype=float8"], "model.dtype='float8'"),
    ("sft", ["model.remat_policy=sometimes"], "model.remat_policy='sometimes'"),
    ("sft", ["model.d_model=0"], "config.model.d_model"),
    ("sft", ["model.n_layers=0"], "config.model.n_layers"),
    ("sft", ["model.norm_eps=-1.0"], "config.model.norm_eps"),
    ("sft", ["model.vocab_size=-5"], "config.model.vocab_size"),
    ("sft", ["model.rope_theta=0.0"], "config.model.rope_theta"),
    ("sft", ["sample.temperature=-1.0"], "config.sample.temperature"),
    ("sft", ["sample.max_new_tokens=0"], "config.sample.max_new_tokens"),
    ("sft", ["sample.every=-1"], "config.sample.every"),
    ("sft", ["eval_samples=0"], "config.eval_samples"),
    ("sft", ["mesh.shape=(0,1,1)"], "config.mesh.shape"),
    ("sft", ["mesh.shape=(-1,-1,1)"], "config.mesh.shape"),
    ("sft", ["mesh.shape=(2,1,1)"],
     ["config.mesh.shape", "needs 2 devices", "1 device(s) are available"]),
    ("sft", ["mesh.shape=(1,1,4)"], ["config.mesh.shape", "needs 4 devices"]),
    ("sft", ["hardware=v4-8"], ["config.hardware='v4-8'", "auto|v5e-8"]),
    ("sft", ["hardware=v5e-8"],
     ["config.hardware='v5e-8' needs its 8 devices", "--config.hardware=auto"]),
    ("sft", ["lora.rank=-2"], "config.lora.rank=-2"),
    ("sft", ["lora.rank=4", "--config.lora.alpha=0.0"], "config.lora.alpha"),
    ("sft", ["lora.rank=4", "--config.lora.dropout=1.5"], "config.lora.dropout"),
    ("sft", ["lora.rank=4", "--config.lora.target_modules=(qq,)"], "config.lora.target_modules"),
    ("sft", ["trainer=nonexistent"], "config.trainer='nonexistent'"),
    ("sft", ["distributed.enabled=True", "--config.distributed.num_processes=2",
             "--config.distributed.process_id=5"], "config.distributed.process_id=5"),
    ("sft", ["capability.num_examples=0", "--config.capability.path=x.jsonl"],
     "config.capability.num_examples"),
    ("sft", ["prompt_eval.max_prompt_len=0"], "config.prompt_eval.max_prompt_len"),
    ("dpo", ["dpo.loss_type=dpo2"], ["config.dpo.loss_type='dpo2'", "sigmoid"]),
    ("dpo", ["dpo.beta=0.0"], "config.dpo.beta"),
    ("dpo", ["dpo.beta=-0.1"], "config.dpo.beta"),
    ("dpo", ["dpo.label_smoothing=0.7"], "config.dpo.label_smoothing"),
    ("dpo", ["dpo.kto_desirable_weight=-1.0", "--config.dpo.loss_type=kto"],
     "config.dpo.kto_desirable_weight"),
    ("dpo", ["dpo.orpo_lambda=-1.0", "--config.dpo.loss_type=orpo"], "config.dpo.orpo_lambda"),
    ("dpo", ["data.source=csv"], ["config.data.source='csv'", "jsonl"]),
    ("dpo", ["data.max_prompt_len=0"], "config.data.max_prompt_len"),
    ("dpo", ["data.max_completion_len=0"], "config.data.max_completion_len"),
    ("dpo", ["data.synthetic_corruption=shuffle"], "config.data.synthetic_corruption"),
    ("dpo", ["data.synthetic_task=poem"], "config.data.synthetic_task"),
    ("rm", ["rm.center_coef=-1.0"], "config.rm.center_coef"),
    ("rm", ["data.source=tsv"], "config.data.source='tsv'"),
    ("grpo", ["grpo.variant=ppo"], ["config.grpo.variant='ppo'", "dapo"]),
    ("grpo", ["rollout.group_size=0"], "config.rollout.group_size"),
    ("grpo", ["rollout.prompts_per_step=0"], "config.rollout.prompts_per_step"),
    ("grpo", ["rollout.max_new_tokens=0"], "config.rollout.max_new_tokens"),
    ("grpo", ["rollout.temperature=-0.5"], "config.rollout.temperature"),
    ("grpo", ["rollout.top_p=1.5"], "config.rollout.top_p"),
    ("grpo", ["rollout.top_p=0.0"], "config.rollout.top_p"),
    ("grpo", ["rollout.top_k=-1"], "config.rollout.top_k"),
    ("grpo", ["rollout.logprob_micro_batch=0"], "config.rollout.logprob_micro_batch"),
    ("grpo", ["rollout.is_correction=ois"], ["config.rollout.is_correction='ois'", "tis"]),
    ("grpo", ["rollout.is_cap=1.0", "--config.rollout.is_correction=tis"],
     ["config.rollout.is_cap", "> 1.0"]),
    ("ppo", ["rollout.is_level=word"], ["config.rollout.is_level='word'", "sequence"]),
    ("grpo", ["rollout.max_staleness=-1"], ["config.rollout.max_staleness", ">= 0"]),
    ("ppo", ["rollout.devices=1"], ["config.rollout.devices=1", "at least one"]),
    ("grpo", ["rollout.devices=-2"], ["config.rollout.devices", ">= 0"]),
    ("grpo", ["rollout.sampler=paged"], ["config.rollout.sampler='paged'", "continuous"]),
    ("grpo", ["rollout.decode_slots=-1"], "config.rollout.decode_slots"),
    ("grpo", ["rollout.env=nosuch"], ["config.rollout.env", "unknown env 'nosuch'"]),
    ("ppo", ['rollout.env={"name": "guess_number", "hii": 16}'],
     ["config.rollout.env", "unknown option(s) ['hii']"]),
    ("grpo", ["rollout.max_turns=0", "--config.rollout.env=guess_number"],
     ["config.rollout.max_turns", ">= 1"]),
    ("grpo", ["rollout.env_tokens_per_call=0", "--config.rollout.env=guess_number"],
     ["config.rollout.env_tokens_per_call", ">= 1"]),
    ("ppo", ["rollout.turn_rewards=each", "--config.rollout.env=guess_number"],
     ["config.rollout.turn_rewards='each'", "per_turn"]),
    ("grpo", ["grpo.minibatches=0"], "config.grpo.minibatches"),
    ("grpo", ["grpo.epochs=0"], "config.grpo.epochs"),
    ("grpo", ["grpo.advantage=zscore"], "config.grpo.advantage='zscore'"),
    ("grpo", ["grpo.aggregation=sum"], "config.grpo.aggregation='sum'"),
    ("grpo", ["grpo.importance=word"], "config.grpo.importance='word'"),
    ("grpo", ["grpo.kl_mode=both"], "config.grpo.kl_mode='both'"),
    ("grpo", ["grpo.kl_estimator=k4"], "config.grpo.kl_estimator='k4'"),
    ("grpo", ["grpo.kl_coef=-0.5"], "config.grpo.kl_coef"),
    ("grpo", ["grpo.clip_eps_low=1.5"], "config.grpo.clip_eps_low"),
    ("grpo", ["grpo.clip_eps_high=-0.5"], "config.grpo.clip_eps_high"),
    ("grpo", ["grpo.std_eps=-1.0"], "config.grpo.std_eps"),
    ("grpo", ["grpo.dynamic_sampling=2"], "config.grpo.dynamic_sampling"),
    ("grpo", ["grpo.old_logps=sampler"], "config.grpo.old_logps"),
    ("grpo", ["grpo.share_prompt=maybe"], "config.grpo.share_prompt"),
    ("dpo", ["dpo.share_prompt=2"], "config.dpo.share_prompt"),
    ("grpo", ["grpo.max_refill_rounds=-1"], "config.grpo.max_refill_rounds"),
    ("grpo", ["reward.spec=nosuch"], ["config.reward.spec", "unknown reward function 'nosuch'"]),
    ("grpo", ['reward.spec=[{"name": "math", "wieght": 1}]'], ["config.reward.spec", "wieght"]),
    ("grpo", ['reward.spec=[{"name": '], "config.reward.spec"),
    ("grpo", ["eval_reward_spec=bogus"], ["config.eval_reward_spec", "bogus"]),
    ("grpo", ["data.source=parquet"], "config.data.source='parquet'"),
    ("grpo", ["data.max_prompt_len=0"], "config.data.max_prompt_len"),
    ("grpo", ["data.synthetic_task=poetry"], "config.data.synthetic_task"),
    ("grpo", ["data.synthetic_digits=0"], "config.data.synthetic_digits"),
    ("grpo", ["eval_prompts=-1"], "config.eval_prompts"),
    ("ppo", ["ppo.critic=both"], "config.ppo.critic='both'"),
    ("ppo", ["ppo.gamma=1.5"], "config.ppo.gamma"),
    ("ppo", ["ppo.lam=-0.1"], "config.ppo.lam"),
    ("ppo", ["ppo.clip_eps=1.5"], "config.ppo.clip_eps"),
    ("ppo", ["ppo.dual_clip=0.5"], "config.ppo.dual_clip"),
    ("ppo", ["ppo.vf_coef=-1.0"], "config.ppo.vf_coef"),
    ("ppo", ["ppo.kl_estimator=k7"], "config.ppo.kl_estimator='k7'"),
    ("ppo", ["ppo.aggregation=median"], "config.ppo.aggregation='median'"),
    ("ppo", ["ppo.epochs=0"], "config.ppo.epochs"),
    ("ppo", ["ppo.adaptive_kl=True", "--config.ppo.kl_target=0.0"], "config.ppo.kl_target"),
    ("prm", ["data.source=csv"], "config.data.source='csv'"),
    ("prm", ["data.max_len=1"], "config.data.max_len: must be >= 2"),
    ("sft", ["data.pad_to=shortest"], ["config.data.pad_to='shortest'", "max|longest|bucket"]),
    ("dpo", ["data.pad_multiple=0"], "config.data.pad_multiple: must be >= 1"),
    ("rm", ["data.buckets=(32,16)", "--config.data.pad_to=bucket"],
     "config.data.buckets: boundaries must be strictly increasing"),
    ("prm", ["data.buckets=(0,64)", "--config.data.pad_to=bucket"],
     "config.data.buckets: every boundary must be >= 1"),
    ("sft", ["data.buckets=abc", "--config.data.pad_to=bucket"],
     "config.data.buckets: expected a tuple of token counts"),
]:
  args = [f"--config.{a}" for a in args[:1]] + list(args[1:])
  add("config", "out of range", f"{trainer}:{' '.join(a[9:] for a in args)}",
      train(trainer, *args), expect, 2)

# ============================================================================
# config: incompatible combinations
# ============================================================================
for trainer, args, expect in [
    ("sft", ["grad_accum_steps=3"], ["config.grad_accum_steps", "not divisible"]),
    ("sft", ["data.max_seq_len=128"], ["config.data.max_seq_len=128", "model.max_seq_len=64"]),
    ("dpo", ["data.buckets=(16,64)", "--config.data.pad_to=bucket"],
     ["config.data.buckets", "boundary 64 exceeds the rows' length 36"]),
    ("sft", ["data.buckets=(16,)"], ["config.data.buckets", "data.pad_to='max'"]),
    ("grpo", ["rollout.group_size=1"],
     ["config.rollout.group_size=1", "grpo.advantage='group_std'", ">= 2"]),
    ("grpo", ["rollout.group_size=1", "--config.grpo.variant=dapo"],
     ["config.rollout.group_size=1", "group_std"]),
    ("grpo", ["rollout.group_size=1", "--config.grpo.variant=rloo"],
     ["config.rollout.group_size=1", "rloo"]),
    ("grpo", ["rollout.group_size=1", "--config.grpo.variant=dr_grpo"],
     ["config.rollout.group_size=1", "'group'"]),
    ("grpo", ["rollout.group_size=1", "--config.grpo.variant=gspo"],
     ["config.rollout.group_size=1", "group_std"]),
    ("grpo", ["grpo.minibatches=3"], ["config.grpo.minibatches=3", "128"]),
    ("grpo", ["rollout.generate_micro_batch=48"], ["config.rollout.generate_micro_batch=48", "128"]),
    ("grpo", ["rollout.logprob_micro_batch=48"], ["config.rollout.logprob_micro_batch=48", "128"]),
    ("grpo", ["rollout.train_micro_batch=48"], ["config.rollout.train_micro_batch=48", "128"]),
    ("grpo", ["grpo.overlong_cache=8", "--config.grpo.variant=dapo"],
     ["config.grpo.overlong_cache=8", "rollout.max_new_tokens=4"]),
    ("grpo", ["rollout.temperature=0.0"], ["config.rollout.temperature=0.0", "greedy"]),
    ("grpo", ["reward.spec="], ["config.reward.spec", "rollout.env"]),
    ("grpo", ["rollout.env=guess_number", "--config.rollout.sampler=continuous"],
     ["config.rollout.sampler", "multi-turn"]),
    ("grpo", ["rollout.env=guess_number", "--config.rollout.max_staleness=1"],
     ["config.rollout.max_staleness", "multi-turn"]),
    ("ppo", ["rollout.env=guess_number", "--config.rollout.stop_at_eos=False"],
     ["config.rollout.stop_at_eos", "multi-turn"]),
    ("grpo", ["rollout.env=guess_number", "--config.rollout.max_tokens_per_turn=5"],
     ["config.rollout.max_tokens_per_turn", "rollout.max_new_tokens=4"]),
    ("ppo", ["rollout.env=guess_number", "--config.rollout.turn_rewards=per_turn",
             "--config.ppo.whiten_rewards=True"], ["config.ppo.whiten_rewards", "per_turn"]),
    ("ppo", ["ppo.minibatches=3"], ["config.ppo.minibatches=3", "128"]),
    ("ppo", ["ppo.critic=shared", "--config.ppo.critic_init=runs/rm"],
     ["config.ppo.critic_init", "separate"]),
    ("dpo", ["dpo.label_smoothing=0.1", "--config.dpo.loss_type=ipo"],
     ["config.dpo.label_smoothing", "ipo"]),
    ("dpo", ["dpo.label_smoothing=0.5", "--config.dpo.loss_type=robust"],
     "config.dpo.label_smoothing"),
    ("dpo", ["data.source=jsonl"], ["config.data.train_path", "data.source='jsonl'"]),
    ("sft", ["data.source=gsm8k_tools"], ["config.data.train_path", "gsm8k_tools"]),
    ("rm", ["data.source=hh_rlhf"], ["config.data.train_path", "data.source='hh_rlhf'"]),
    ("grpo", ["data.source=gsm8k"], ["config.data.train_path", "data.source='gsm8k'"]),
    ("prm", ["data.train_path=", "--config.data.source=gsm8k"],
     ["config.data.train_path", "data.source='gsm8k'"]),
    ("sft", ["distributed.coordinator_address=h:1234", "--config.distributed.enabled=True"],
     ["config.distributed.coordinator_address", "num_processes"]),
    ("sft", ["lora.rank=4", "--config.lora.trainable=(nosuch,)", *SFT_OK],
     "config.lora.trainable"),
]:
  args = [f"--config.{a}" for a in args[:1]] + list(args[1:])
  add("config", "incompatible", f"{trainer}:{' '.join(a[9:] for a in args)}",
      train(trainer, *args), expect, 2)

# Mesh vs devices: these need 8 devices, so they run as processes (test_exit_status).
add("config", "incompatible", "sft:batch_size=12 on a (8,1,1) mesh",
    train("sft", "--config.mesh.shape=(8,1,1)", "--config.batch_size=12"),
    ["config.batch_size", "12 is not divisible by the data-parallel size 8"], 2, devices=8)
add("config", "incompatible", "sft:mesh.shape=(3,1,1) on 8 devices",
    train("sft", "--config.mesh.shape=(3,1,1)"),
    ["config.mesh.shape=[3, 1, 1] needs 3 devices", "8 device(s) are available"], 2, devices=8)

# ============================================================================
# config: the config file and the command line itself
# ============================================================================
add("config", "command line", "config file missing",
    ["train", "--config=configs/nope.py", "--workdir={wd}"], "--config: file not found", 2)
add("config", "command line", "unknown preset",
    ["train", "--config=configs/sft.py:huge", "--workdir={wd}"], ["huge", "tiny"], 2)
add("config", "command line", "no --config", ["train", "--workdir={wd}"], "train needs --config", 2)
add("config", "command line", "no --workdir", ["train", "--config=configs/sft.py:tiny"],
    "train needs --workdir", 2)
add("config", "command line", "unknown command", ["trian", "--config=configs/sft.py:tiny"],
    "unknown command 'trian'", 2)
add("config", "command line", "stray argument",
    ["train", "--config=configs/sft.py:tiny", "--workdir={wd}", "extra"],
    "unexpected argument 'extra'", 2)
add("config", "command line", "config file syntax error",
    ["train", "--config={bad}", "--workdir={wd}"], ["{bad}", "SyntaxError"], 2,
    raw(b"def get_config(:\n  pass\n", name="bad.py"))
add("config", "command line", "config file without get_config",
    ["train", "--config={bad}", "--workdir={wd}"], ["{bad}", "get_config"], 2,
    raw(b"X = 1\n", name="bad.py"))
add("config", "command line", "get_config raising",
    ["train", "--config={bad}", "--workdir={wd}"], ["{bad}", "KeyError"], 2,
    raw(b"def get_config():\n  return {}['x']\n", name="bad.py"))
add("config", "command line", "get_config returns no ConfigDict",
    ["train", "--config={bad}", "--workdir={wd}"], ["{bad}", "ConfigDict"], 2,
    raw(b"def get_config():\n  return 3\n", name="bad.py"))
add("config", "command line", "import: wrong arguments", ["import", "only_one"],
    "usage: rlhf-jax import SRC OUT_DIR", 2)
add("config", "command line", "workdir is a file",
    ["train", "--config=configs/sft.py:tiny", "--workdir={wd}/config.json"],
    ["{wd}/config.json", "not a directory"], 2)

# ============================================================================
# data: SFT JSONL (data.train_path / data.eval_path)
# ============================================================================
SFT = ("--config.tokenizer.path={tok}", "--config.data.train_path={bad}",
       "--config.data.max_seq_len=64")
for name, setup, expect in [
    ("non-UTF-8 bytes", lines(OK_SFT, b'{"prompt": "\xff\xfe", "completion": "x"}'),
     ["{bad}:2: not valid UTF-8"]),
    ("invalid JSON", lines(OK_SFT, OK_SFT, '{"prompt": "a", "completion": }'),
     ["{bad}:3: not valid JSON"]),
    ("truncated last line", raw(json.dumps(OK_SFT).encode() + b'\n{"prompt": "ab'),
     ["{bad}:2: not valid JSON"]),
    ("array row", lines(["reverse: abc", "cba"]), ["{bad}:1: expected a JSON object, got list"]),
    ("string row", lines('"hello"'), ["{bad}:1: expected a JSON object, got str"]),
    ("missing completion", lines(OK_SFT, {"prompt": "a"}), ["{bad}:2: missing key 'completion'"]),
    ("missing prompt", lines({"completion": "a"}), ["{bad}:1: missing key 'prompt'"]),
    ("prompt not a string", lines({"prompt": 3, "completion": "a"}),
     ["{bad}:1: 'prompt' must be a string, got int"]),
    ("completion null", lines({"prompt": "a", "completion": None}),
     ["{bad}:1: 'completion' must be a string, got NoneType"]),
    ("completion a list", lines({"prompt": "a", "completion": ["b"]}),
     ["{bad}:1: 'completion' must be a string, got list"]),
    ("empty completion", lines(OK_SFT, {"prompt": "a", "completion": ""}),
     ["{bad}:2: 'completion' is empty"]),
    ("blank completion", lines({"prompt": "a", "completion": "  \n"}),
     ["{bad}:1: 'completion' is empty"]),
    ("messages not a list", lines({"messages": "hi"}), ["{bad}:1: 'messages' must be a list"]),
    ("one message", lines({"messages": [{"role": "user", "content": "a"}]}),
     ["{bad}:1: 'messages' must be a list of >= 2"]),
    ("last message not assistant", lines({"messages": [{"role": "assistant", "content": "a"},
                                                       {"role": "user", "content": "b"}]}),
     ["{bad}:1: the last message must have role 'assistant'"]),
    ("message without content", lines({"messages": [{"role": "user"},
                                                    {"role": "assistant", "content": "b"}]}),
     ["{bad}:1: 'messages' must be a list"]),
    ("message content not a string", lines({"messages": [{"role": "user", "content": 1},
                                                         {"role": "assistant", "content": "b"}]}),
     ["{bad}:1: 'messages' must be a list"]),
    ("empty assistant message", lines({"messages": [{"role": "user", "content": "a"},
                                                    {"role": "assistant", "content": ""}]}),
     ["{bad}:1: 'completion' is empty"]),
    ("weight on a tool message", lines({"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 1},
        {"role": "tool", "content": "c", "weight": 1}, {"role": "assistant", "content": "d"}]}),
     ["{bad}:1: messages[2] has role 'tool' and a 'weight'"]),
    ("message weight 2", lines({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b", "weight": 2}]}),
     ["{bad}:1: messages[1]['weight']=2: expected 0 or 1"]),
    ("empty file", raw(b""), ["{bad}: no examples (empty file)"]),
    ("blank lines only", raw(b"\n  \n\n"), ["{bad}: no examples (empty file)"]),
    ("gzip bytes as JSONL", raw(gzip.compress(b'{"prompt": "a"}\n')), ["{bad}:1: not valid UTF-8"]),
]:
  add("data", "SFT JSONL", name, train("sft", *SFT), expect, 1, setup)
add("data", "SFT JSONL", "row longer than data.max_seq_len (overlength=error)",
    train("sft", *SFT, "--config.data.max_seq_len=40"),
    ["{bad}:2: example is", "longer than data.max_seq_len=40", "overlength"], 1,
    lines(OK_SFT, {"prompt": "reverse: abcdefgh", "completion": "hgfedcba"}))
add("data", "SFT JSONL", "every row dropped (overlength=drop)",
    train("sft", *SFT, "--config.data.max_seq_len=4", "--config.data.overlength=drop"),
    ["{bad}: no usable examples", "max_seq_len=4"], 1, lines(OK_SFT, OK_SFT))
add("data", "SFT JSONL", "fewer rows than batch_size", train("sft", *SFT),
    ["only 2 rows of data but batch_size=32"], 1, lines(OK_SFT, OK_SFT))
add("data", "SFT JSONL", "missing file",
    train("sft", "--config.tokenizer.path={tok}", "--config.data.train_path={tmp}/nope.jsonl"),
    ["data file not found: {tmp}/nope.jsonl"], 1)
add("data", "SFT JSONL", "path is a directory",
    train("sft", "--config.tokenizer.path={tok}", "--config.data.train_path={tmp}"),
    ["{tmp}", "is a directory"], 1)
add("data", "SFT JSONL", "bad eval file",
    train("sft", *SFT_OK,
          "--config.data.eval_path={bad}"),
    ["{bad}:1: missing key 'completion'"], 1, lines({"prompt": "a"}))
add("data", "SFT JSONL", "bad capability file",
    train("sft", *SFT_OK,
          "--config.capability.path={bad}"),
    ["{bad}:1: not valid JSON"], 1, lines("{oops"))
add("data", "SFT JSONL", "bad prompt_eval file",
    train("sft", *SFT_OK,
          "--config.prompt_eval.path={bad}"),
    ["{bad}:1: missing key 'prompt'"], 1, lines({"question": "a"}))

# ============================================================================
# data: preference pairs (reward model, DPO)
# ============================================================================
PAIRS = ("--config.tokenizer.path={tok}", "--config.data.source=jsonl",
         "--config.data.train_path={bad}")
for trainer, name, setup, expect in [
    ("dpo", "non-UTF-8 bytes", lines(OK_PAIR, b'{"prompt": "a", "chosen": "\xc3", "rejected": "b"}'),
     "{bad}:2: not valid UTF-8"),
    ("dpo", "invalid JSON", lines("{'prompt': 'a'}"), "{bad}:1: not valid JSON"),
    ("dpo", "array row", lines([1, 2]), "{bad}:1: expected a JSON object"),
    ("dpo", "missing chosen", lines(OK_PAIR, {"prompt": "a", "rejected": "b"}),
     "{bad}:2: missing key 'chosen'"),
    ("dpo", "missing rejected", lines({"prompt": "a", "chosen": "b"}),
     "{bad}:1: missing key 'rejected'"),
    ("rm", "missing prompt", lines({"chosen": "a", "rejected": "b"}), "{bad}:1: missing key 'prompt'"),
    ("dpo", "chosen not a string", lines({**OK_PAIR, "chosen": 1}),
     "{bad}:1: 'chosen' must be a string, got int"),
    ("dpo", "rejected a list", lines({**OK_PAIR, "rejected": ["x"]}),
     "{bad}:1: 'rejected' must be a string, got list"),
    ("dpo", "prompt list of strings", lines({**OK_PAIR, "prompt": ["a", "b"]}),
     "{bad}:1: 'prompt' must be a string or a non-empty list"),
    ("dpo", "prompt empty list", lines({**OK_PAIR, "prompt": []}),
     "{bad}:1: 'prompt' must be a string or a non-empty list"),
    ("dpo", "prompt message role not a string",
     lines({**OK_PAIR, "prompt": [{"role": 1, "content": "a"}]}), "{bad}:1: 'prompt' must be"),
    ("dpo", "NaN margin", lines(OK_PAIR, '{"prompt": "a", "chosen": "b", "rejected": "c", '
                                         '"margin": NaN}'),
     "{bad}:2: 'margin' must be a finite number, got nan"),
    ("rm", "NaN margin", lines('{"prompt": "a", "chosen": "b", "rejected": "c", "margin": NaN}'),
     "{bad}:1: 'margin' must be a finite number, got nan"),
    ("dpo", "Infinity margin", lines('{"prompt": "a", "chosen": "b", "rejected": "c", '
                                     '"margin": Infinity}'),
     "{bad}:1: 'margin' must be a finite number, got inf"),
    ("dpo", "-Infinity margin", lines('{"prompt": "a", "chosen": "b", "rejected": "c", '
                                      '"margin": -Infinity}'),
     "{bad}:1: 'margin' must be a finite number, got -inf"),
    ("dpo", "margin a string", lines({**OK_PAIR, "margin": "high"}),
     "{bad}:1: 'margin' must be a finite number, got 'high'"),
    ("dpo", "margin a bool", lines({**OK_PAIR, "margin": True}),
     "{bad}:1: 'margin' must be a finite number, got True"),
    ("dpo", "identical chosen and rejected", lines(OK_PAIR, {**OK_PAIR, "rejected": "cba"}),
     ["{bad}:2: 'chosen' and 'rejected' are identical", "skip_malformed"]),
    ("rm", "identical chosen and rejected", lines({**OK_PAIR, "rejected": "cba"}),
     "{bad}:1: 'chosen' and 'rejected' are identical"),
    ("dpo", "identical up to whitespace", lines({**OK_PAIR, "rejected": " cba\n"}),
     "{bad}:1: 'chosen' and 'rejected' are identical"),
    ("dpo", "both replies empty", lines({**OK_PAIR, "chosen": "", "rejected": " "}),
     "{bad}:1: 'chosen' and 'rejected' are identical"),
    ("dpo", "empty file", raw(b""), "no usable examples"),
    ("dpo", "corrupt .gz", raw(b"\x1f\x8b\x08\x00garbage", name="bad.jsonl.gz"),
     ["{bad}", "gzip"]),
    ("dpo", "fewer pairs than batch_size", lines(OK_PAIR, {**OK_PAIR, "rejected": "acb"}),
     "only 2 preference pairs but batch_size=32"),
]:
  add("data", "preference JSONL", f"{trainer}: {name}", train(trainer, *PAIRS), expect, 1, setup)
add("data", "preference JSONL", "dpo: missing file",
    train("dpo", "--config.tokenizer.path={tok}", "--config.data.source=jsonl",
          "--config.data.train_path={tmp}/nope.jsonl"), "data file not found: {tmp}/nope.jsonl", 1)
add("data", "preference JSONL", "dpo: bad eval file",
    train("dpo", "--config.tokenizer.path={tok}", "--config.data.source=jsonl",
          "--config.data.train_path={pairs}", "--config.data.eval_path={bad}"),
    "{bad}:1: 'chosen' must be a string", 1, lines({**OK_PAIR, "chosen": None}))
HH = ("--config.tokenizer.path={tok}", "--config.data.source=hh_rlhf",
      "--config.data.train_path={bad}")
HH_OK = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}
for name, setup, expect in [
    ("rejected without an Assistant turn",
     lines(HH_OK, {"chosen": HH_OK["chosen"], "rejected": "\n\nHuman: hi"}),
     ["{bad}:2:", "Assistant:"]),
    ("chosen not a string", lines({"chosen": 5, "rejected": "x"}),
     "{bad}:1: 'chosen' must be a string"),
    ("text before the first turn", lines({"chosen": "hey\n\nHuman: a\n\nAssistant: b",
                                          "rejected": "hey\n\nHuman: a\n\nAssistant: c"}),
     ["{bad}:1:", "text before the first"]),
]:
  add("data", "HH-RLHF", f"rm: {name}", train("rm", *HH), expect, 1, setup)
add("data", "HH-RLHF", "rm: directory without the subset's files",
    train("rm", "--config.tokenizer.path={tok}", "--config.data.source=hh_rlhf",
          "--config.data.train_path={tmp}"), "no HH-RLHF files for subset 'harmless-base'", 1)

# ============================================================================
# data: RL prompts (GRPO, PPO) and GSM8K
# ============================================================================
PROMPTS = ("--config.tokenizer.path={tok}", "--config.data.source=jsonl",
           "--config.data.train_path={bad}")
for trainer, name, setup, expect in [
    ("grpo", "non-UTF-8 bytes", lines(OK_PROMPT, b'{"prompt": "\x80"}'),
     "{bad}:2: not valid UTF-8"),
    ("grpo", "invalid JSON", lines("{prompt: 1}"), "{bad}:1: not valid JSON"),
    ("grpo", "missing prompt", lines({"question": "a"}), "{bad}:1: missing key 'prompt'"),
    ("ppo", "missing prompt", lines(OK_PROMPT, {"answer": "3"}), "{bad}:2: missing key 'prompt'"),
    ("grpo", "answer a list", lines({"prompt": "a", "answer": [1]}),
     "{bad}:1: 'answer' must be a string or a finite number"),
    ("grpo", "answer NaN", lines('{"prompt": "a", "answer": NaN}'),
     "{bad}:1: 'answer' must be a string or a finite number"),
    ("grpo", "solution not a string", lines({"prompt": "a", "solution": 3}),
     "{bad}:1: 'solution' must be a string"),
    ("grpo", "empty prompt", lines(OK_PROMPT, {"prompt": "", "answer": "1"}),
     "{bad}:2: 'prompt' is empty"),
    ("ppo", "blank prompt", lines({"prompt": " \t", "answer": "1"}), "{bad}:1: 'prompt' is empty"),
    ("grpo", "prompt messages malformed", lines({"prompt": [{"content": "a"}]}),
     "{bad}:1: 'prompt' must be"),
    ("grpo", "empty file", raw(b"\n"), "no usable examples"),
    ("grpo", "fewer prompts than prompts_per_step", lines(OK_PROMPT),
     ["1 prompts", "rollout.prompts_per_step=16"]),
]:
  add("data", "RL prompts", f"{trainer}: {name}", train(trainer, *PROMPTS), expect, 1, setup)
GSM = ("--config.tokenizer.path={tok}", "--config.data.source=gsm8k",
       "--config.data.train_path={bad}")
for name, setup, expect in [
    ("answer without ####", lines({"question": "q", "answer": "42"}),
     "{bad}:1: 'answer' must be a string ending in '#### <number>'"),
    ("nothing after ####", lines({"question": "q", "answer": "so #### "}),
     "{bad}:1: nothing after '####'"),
    ("question not a string", lines({"question": 1, "answer": "#### 1"}),
     "{bad}:1: 'question' must be a string"),
]:
  add("data", "GSM8K", f"grpo: {name}", train("grpo", *GSM), expect, 1, setup)
add("data", "RL prompts", "grpo: missing file",
    train("grpo", "--config.tokenizer.path={tok}", "--config.data.source=jsonl",
          "--config.data.train_path={tmp}/nope.jsonl"), "data file not found", 1)

# ============================================================================
# data: PRM step labels
# ============================================================================
PRM = ("--config.tokenizer.path={tok}", "--config.data.source=jsonl",
       "--config.data.train_path={bad}")
for name, setup, expect in [
    ("labels shorter than steps", lines(OK_PRM, {**OK_PRM, "labels": [1]}),
     "{bad}:2: 'labels' must be a list of 0/1, one per step (2 steps)"),
    ("label 2", lines({**OK_PRM, "labels": [1, 2]}), "{bad}:1: 'labels' must be a list of 0/1"),
    ("label 0.5", lines({**OK_PRM, "labels": [1, 0.5]}), "{bad}:1: 'labels' must be a list of 0/1"),
    ("missing steps", lines({"prompt": "a", "labels": [1]}),
     "{bad}:1: 'steps' must be a non-empty list of strings"),
    ("empty steps", lines({"prompt": "a", "steps": [], "labels": []}),
     "{bad}:1: 'steps' must be a non-empty list of strings"),
    ("missing prompt", lines({"steps": ["a"], "labels": [1]}), "{bad}:1:"),
    ("invalid JSON", lines(OK_PRM, "{"), "{bad}:2:"),
    ("non-UTF-8 bytes", lines(b'{"prompt": "\xff", "steps": ["a"], "labels": [1]}'),
     "{bad}:1: not valid UTF-8"),
    ("empty file", raw(b""), "{bad}: no examples"),
]:
  add("data", "PRM JSONL", name, train("prm", *PRM), expect, 1, setup)
add("data", "PRM JSONL", "missing file",
    train("prm", "--config.tokenizer.path={tok}", "--config.data.source=jsonl",
          "--config.data.train_path={tmp}/nope.jsonl"), "{tmp}/nope.jsonl", 1)


# ============================================================================
# checkpoints (resume, init_from a run, export, eval-rm)
# ============================================================================
def ckpt_files(wd):
  step_dir = os.path.join(wd, "checkpoints", "2")
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs)


def truncate_ckpt(tmp, env):
  for p in ckpt_files(env["wd"]):
    if os.path.getsize(p) > 64:
      with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


def delete_ckpt_data(tmp, env):
  for p in ckpt_files(env["wd"]):
    if "ocdbt" in p or "/d/" in p:
      os.remove(p)


def garbage_metadata(tmp, env):
  for p in ckpt_files(env["wd"]):
    if os.path.basename(p) in ("_METADATA", "_CHECKPOINT_METADATA"):
      with open(p, "w") as f:
        f.write("garbage")


def edit_json(rel, **changes):
  def setup(tmp, env):
    path = os.path.join(env["wd"], rel)
    with open(path) as f:
      d = json.load(f)
    d.update(changes)
    with open(path, "w") as f:
      json.dump(d, f)
  return setup


def write_file(rel, text):
  def setup(tmp, env):
    path = os.path.join(env["wd"], rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
  return setup


def lora_marker(rank):
  return write_file("lora/config.json", json.dumps(
      {"rank": rank, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q", "k", "v", "o"],
       "trainable": []}))


RESUME = train("sft", *RUN)
for name, extra, setup, expect in [
    ("different d_model", ["--config.model.d_model=48"], None,
     ["checkpoint {wd}/checkpoints/2", "tensor 'params/embed/embedding'", ", 32) but",
      ", 48) (different model shape?)"]),
    ("different n_layers", ["--config.model.n_layers=2"], None,
     ["checkpoint {wd}/checkpoints/2", "tensor 'params/", "has shape (1,", "expects (2,"]),
    ("different d_ff", ["--config.model.d_ff=32"], None,
     ["tensor 'params/layers/down/kernel' has shape (1, 64, 32)", "expects (1, 32, 32)"]),
    ("untied embeddings", ["--config.model.tie_embeddings=False"], None,
     ["checkpoint {wd}/checkpoints/2", "missing tensors", "lm_head"]),
    ("different optimizer (no clipping)", ["--config.optimizer.grad_clip_norm=0.0"], None,
     ["checkpoint {wd}/checkpoints/2", "different model/optimizer"]),
    ("truncated files", [], truncate_ckpt, ["checkpoint {wd}/checkpoints/2"]),
    ("array data deleted", [], delete_ckpt_data, ["checkpoint {wd}/checkpoints/2"]),
    ("garbage metadata", [], garbage_metadata, ["checkpoint {wd}/checkpoints/2"]),
    ("LoRA run resumed without LoRA", [], lora_marker(4), ["LoRA adapters", "config.lora"]),
    ("full run resumed with LoRA", ["--config.lora.rank=4"], None,
     ["not written by a LoRA run", "config.lora.rank=4"]),
    ("LoRA rank differs", ["--config.lora.rank=4"], lora_marker(8),
     ["config.lora differs", "{wd}/lora/config.json"]),
    ("LoRA config unreadable", ["--config.lora.rank=4"], write_file("lora/config.json", "{"),
     ["{wd}/lora/config.json"]),
]:
  code = 2 if name.startswith("LoRA rank") else 1
  add("checkpoint", "resume", name, RESUME + tuple(extra), expect, code, setup, workdir="run")


add("checkpoint", "resume", "WORKDIR/lora holds a file rlhf-jax did not write",
    train("sft", *SMALL, *SFT_OK, "--config.lora.rank=4"),
    ["{wd}/lora", "did not write", "notes.md"], 1, write_file("lora/notes.md", "mine\n"))


def init_from_copy(mutate=None):
  """setup: env['src'] = a copy of the real run (then mutated), the init_from source."""
  def setup(tmp, env):
    src = os.path.join(tmp, "src")
    shutil.copytree(env["run"], src)
    env["src"] = src
    if mutate:
      mutate(src)
  return setup


def _truncate_all(src):
  truncate_ckpt(None, {"wd": src})


def _edit_model_config(**changes):
  def mutate(src):
    edit_json("model_config.json", **changes)(None, {"wd": src})
  return mutate


def _write(rel, text):
  def mutate(src):
    write_file(rel, text)(None, {"wd": src})
  return mutate


def _empty_checkpoints(src):
  shutil.rmtree(os.path.join(src, "checkpoints"))
  os.makedirs(os.path.join(src, "checkpoints"))


INIT = train("sft", *SMALL, *SFT_OK, "--config.init_from={src}")
for name, mutate, expect in [
    ("truncated checkpoint", _truncate_all, ["{src}/checkpoints"]),
    ("no finished checkpoint", _empty_checkpoints, ["no finished checkpoint in {src}/checkpoints"]),
    ("model_config.json not JSON", _write("model_config.json", "{"),
     ["{src}/model_config.json", "JSON"]),
    ("model_config.json unknown key", _edit_model_config(n_experts=8),
     ["{src}/model_config.json", "n_experts"]),
    ("model_config.json disagrees with the weights", _edit_model_config(d_ff=48),
     ["{src}", "['layers']['down']['kernel'] has shape (1, 64, 32), expected (1, 48, 32)"]),
]:
  add("checkpoint", "init_from a run", name, INIT, expect, 1, init_from_copy(mutate))
add("checkpoint", "model family", "SFT from a reward model's run", INIT,
    ["{src}", "reward model", "language model"], 1, lambda tmp, env: env.update(src=env["rm_run"]))
add("checkpoint", "model family", "PPO critic from an SFT run (not a reward model)",
    train("ppo", *SMALL, "--config.tokenizer.path={tok}", "--config.data.source=jsonl",
          "--config.data.train_path={prompts}", "--config.init_from={run}",
          "--config.ppo.critic_init={run}"),
    ["config.ppo.critic_init", "{run}", "reward model"], 1)
add("checkpoint", "model family", "reward model from a PPO run's policy+value",
    train("rm", *SMALL, "--config.tokenizer.path={tok}", "--config.data.source=jsonl",
          "--config.data.train_path={pairs}", "--config.init_from={src}"),
    ["{src}", "policy"], 1, lambda tmp, env: env.update(src=env["ppo_run"]))
add("checkpoint", "model family", "eval-rm on an SFT run",
    ["eval-rm", "--checkpoint={run}", "--data={pairs}"], ["{run}", "reward model"], 1)
add("checkpoint", "export", "workdir without checkpoints",
    ["export", "{tmp}/empty_run", "{tmp}/out"], ["{tmp}/empty_run"], 1,
    lambda tmp, env: os.makedirs(os.path.join(tmp, "empty_run")))
add("checkpoint", "export", "step that does not exist",
    ["export", "{run}", "{tmp}/out", "--step=7"], ["{run}", "7"], 1)
add("checkpoint", "export", "truncated checkpoint",
    ["export", "{src}", "{tmp}/out"], ["{src}/checkpoints"], 1, init_from_copy(_truncate_all))
add("checkpoint", "eval-rm", "no such run",
    ["eval-rm", "--checkpoint={tmp}/nope", "--data={pairs}"], ["{tmp}/nope"], 1)


# ============================================================================
# pretrained files (init_from, tokenizer.path, rlhf-jax import)
# ============================================================================
def hf_dir(mutate=None, cfg_changes=None, drop=(), add_tensors=None, name="hf"):
  """setup: env['hf'] = a tiny HF llama dir (config.json + model.safetensors), altered."""
  def setup(tmp, env):
    from safetensors.numpy import save_file
    from test_pretrained import hf_checkpoint
    cfg, W = hf_checkpoint("llama", V=64, D=32, L=1, H=2, K=1, Dh=16, F=64)
    cfg = {**cfg, "architectures": ["LlamaForCausalLM"], **(cfg_changes or {})}
    for k in [k for k, v in cfg.items() if v is _DROP]:
      del cfg[k]
    for d in drop:
      del W[d]
    W.update(add_tensors or {})
    path = os.path.join(tmp, name)
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(cfg, f)
    save_file(W, os.path.join(path, "model.safetensors"))
    env[name] = path
    if mutate:
      mutate(path)
  return setup


_DROP = object()
HF = train("sft", *SMALL, *SFT_OK, "--config.init_from={hf}")


def both_(*mutators):
  def mutate(p):
    for m in mutators:
      m(p)
  return mutate


def _rm(name):
  return lambda p: os.remove(os.path.join(p, name))


def _put(name, data: bytes):
  def mutate(p):
    with open(os.path.join(p, name), "wb") as f:
      f.write(data)
  return mutate


def _truncate(name):
  def mutate(p):
    f = os.path.join(p, name)
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)
  return mutate


def _replace_tensor(name, array):
  def mutate(p):
    from safetensors.numpy import load_file, save_file
    W = load_file(os.path.join(p, "model.safetensors"))
    W[name] = array
    save_file(W, os.path.join(p, "model.safetensors"))
  return mutate


L0 = "model.layers.0."
for name, setup, expect in [
    ("no config.json", hf_dir(_rm("config.json")), ["{hf}", "no config.json"]),
    ("config.json not JSON", hf_dir(_put("config.json", b"{")), ["{hf}/config.json", "not valid JSON"]),
    ("config.json a list", hf_dir(_put("config.json", b"[]")), ["{hf}/config.json", "object"]),
    ("model_type gpt2", hf_dir(cfg_changes={"model_type": "gpt2"}),
     ["{hf}/config.json", "model_type='gpt2' is not supported", "llama"]),
    ("model_type missing", hf_dir(cfg_changes={"model_type": _DROP}),
     ["{hf}/config.json", "model_type=None is not supported"]),
    ("BERT architecture", hf_dir(cfg_changes={"model_type": "bert",
                                              "architectures": ["BertForMaskedLM"]}),
     ["{hf}/config.json", "model_type='bert'"]),
    ("llama config with a non-causal-LM architecture",
     hf_dir(cfg_changes={"architectures": ["LlamaForSequenceClassification"]}),
     ["{hf}/config.json", "LlamaForSequenceClassification"]),
    ("missing hidden_size", hf_dir(cfg_changes={"hidden_size": _DROP}),
     ["{hf}/config.json", "missing key 'hidden_size'"]),
    ("hidden_size not a number", hf_dir(cfg_changes={"hidden_size": "big"}),
     ["{hf}/config.json", "hidden_size"]),
    ("heads not dividing", hf_dir(cfg_changes={"num_attention_heads": 3, "num_key_value_heads": 2}),
     ["{hf}/config.json", "n_heads=3"]),
    ("hidden_act relu", hf_dir(cfg_changes={"hidden_act": "relu"}),
     ["{hf}/config.json", "hidden_act='relu'"]),
    ("rope_scaling yarn", hf_dir(cfg_changes={"rope_scaling": {"rope_type": "yarn", "factor": 4}}),
     ["{hf}/config.json", "rope_scaling type 'yarn'"]),
    ("partial rotary", hf_dir(cfg_changes={"partial_rotary_factor": 0.5}),
     ["{hf}/config.json", "partial_rotary_factor=0.5"]),
    ("only pytorch_model.bin", hf_dir(both_(_rm("model.safetensors"),
                                            _put("pytorch_model.bin", b"\x80\x04pickle"))),
     ["{hf}", "PyTorch pickles are not read"]),
    ("missing tensor", hf_dir(drop=[L0 + "mlp.down_proj.weight"]),
     ["{hf}/model.safetensors", "missing tensor 'model.layers.0.mlp.down_proj.weight'",
      "[32, 64]"]),
    ("missing embedding", hf_dir(drop=["model.embed_tokens.weight"]),
     ["missing tensor 'model.embed_tokens.weight'", "[64, 32]"]),
    ("wrong shape", hf_dir(_replace_tensor(L0 + "mlp.up_proj.weight",
                                           np.zeros((48, 32), np.float32))),
     ["'model.layers.0.mlp.up_proj.weight' has shape [48, 32], expected [64, 32]"]),
    ("vocab_size disagrees with the embedding", hf_dir(cfg_changes={"vocab_size": 80}),
     ["'model.embed_tokens.weight' has shape [64, 32], expected [80, 32]"]),
    ("unexpected tensor", hf_dir(add_tensors={L0 + "mlp.extra.weight": np.zeros(3, np.float32)}),
     ["unexpected tensors", "model.layers.0.mlp.extra.weight"]),
    ("integer tensor", hf_dir(_replace_tensor(L0 + "mlp.up_proj.weight",
                                              np.zeros((64, 32), np.int32))),
     ["'model.layers.0.mlp.up_proj.weight'", "dtype", "int32", "float"]),
    ("nonzero o_proj bias", hf_dir(add_tensors={L0 + "self_attn.o_proj.bias":
                                                np.ones(32, np.float32)}),
     ["'model.layers.0.self_attn.o_proj.bias' is nonzero"]),
    ("truncated safetensors", hf_dir(_truncate("model.safetensors")),
     ["{hf}/model.safetensors", "cannot read safetensors file"]),
    ("garbage safetensors", hf_dir(_put("model.safetensors", b"not safetensors at all")),
     ["{hf}/model.safetensors", "cannot read safetensors file"]),
    ("index not JSON", hf_dir(both_(_rm("model.safetensors"),
                                    _put("model.safetensors.index.json", b"{"))),
     ["{hf}/model.safetensors.index.json", "weight_map"]),
    ("index names a missing shard",
     hf_dir(both_(_rm("model.safetensors"), _put("model.safetensors.index.json", json.dumps(
         {"weight_map": {"model.embed_tokens.weight": "model-00001.safetensors"}}).encode()))),
     ["{hf}/model-00001.safetensors", "does not exist"]),
]:
  add("pretrained", "Hugging Face dir", name, HF, expect, 1, setup)


def gguf_file(kind):
  """setup: env['gguf'] = a .gguf file that is wrong in the way `kind` says."""
  def setup(tmp, env):
    path = os.path.join(tmp, "m.gguf")
    env["gguf"] = path
    if kind == "bad magic":
      with open(path, "wb") as f:
        f.write(b"GGML" + b"\0" * 60)
      return
    if kind == "truncated header":
      with open(path, "wb") as f:
        f.write(b"GGUF\x03\0\0\0" + b"\xff" * 12)
      return
    import gguf
    from test_pretrained import hf_checkpoint, write_gguf
    if kind == "architecture gpt2":
      w = gguf.GGUFWriter(path, "gpt2")
      w.add_block_count(1)
      w.write_header_to_file()
      w.write_kv_data_to_file()
      w.write_tensors_to_file()
      w.close()
      return
    cfg, W = hf_checkpoint("llama", V=64, D=32, L=1, H=2, K=1, Dh=16, F=64)
    if kind == "missing tensor":
      del W[L0 + "self_attn.v_proj.weight"]
    write_gguf(path, "llama", cfg, W)
    if kind == "truncated tensors":
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4096)
  return setup


GGUF = train("sft", *SMALL, *SFT_OK, "--config.init_from={gguf}")
for kind, expect in [
    ("bad magic", ["{gguf}: not a GGUF file"]),
    ("truncated header", ["{gguf}: cannot read GGUF file"]),
    ("architecture gpt2", ["{gguf}: GGUF architecture 'gpt2' is not supported"]),
    ("missing tensor", ["{gguf}: missing tensor 'model.layers.0.self_attn.v_proj.weight'"]),
    ("truncated tensors", ["{gguf}"]),
]:
  add("pretrained", "GGUF file", kind, GGUF, expect, 1, gguf_file(kind))


def imported_dir(mutate):
  """setup: env['imp'] = a directory in `rlhf-jax import` format, then mutated."""
  def setup(tmp, env):
    from rlhf_jax.models import import_checkpoint
    hf_dir()(tmp, env)
    path = os.path.join(tmp, "imported")
    import_checkpoint(env["hf"], path)
    env["imp"] = path
    mutate(path)
  return setup


IMP = train("sft", *SMALL, *SFT_OK, "--config.init_from={imp}")
for name, mutate, expect in [
    ("model_config.json not JSON", _put("model_config.json", b"{"),
     ["{imp}/model_config.json", "expected a JSON ModelConfig"]),
    ("params/ missing", lambda p: shutil.rmtree(os.path.join(p, "params")),
     ["{imp}/params", "missing orbax parameter checkpoint"]),
    ("params of another shape", both_(lambda p: edit_json("model_config.json", d_ff=48)(
        None, {"wd": p})), ["{imp}/params", "cannot restore parameters"]),
]:
  add("pretrained", "imported dir", name, IMP, expect, 1, imported_dir(mutate))

TOK = train("sft", "--config.data.train_path={sft}", "--config.tokenizer.path={bad}")
add("pretrained", "tokenizer", "no such file",
    train("sft", "--config.data.train_path={sft}", "--config.tokenizer.path={tmp}/nope.model"),
    "{tmp}/nope.model: no such tokenizer file", 1)
add("pretrained", "tokenizer", "garbage .model file", TOK, ["{bad}", "SentencePiece"], 1,
    raw(b"not a sentencepiece model", name="bad.model"))
add("pretrained", "tokenizer", "directory without tokenizer files", TOK, ["{bad}", "tokenizer"], 1,
    lambda tmp, env: (os.makedirs(os.path.join(tmp, "d")), env.update(bad=os.path.join(tmp, "d"))))
add("pretrained", "tokenizer", "tokenizer.json not JSON", TOK, ["{bad}/tokenizer.json"], 1,
    lambda tmp, env: (os.makedirs(os.path.join(tmp, "d")),
                      open(os.path.join(tmp, "d", "tokenizer.json"), "w").write("{"),
                      env.update(bad=os.path.join(tmp, "d"))))
add("pretrained", "tokenizer", "model vocabulary smaller than the tokenizer's",
    train("sft", *SMALL, *SFT_OK, "--config.model.vocab_size=8"),
    ["model vocab_size=8", "tokenizer's vocabulary"], 2)
add("pretrained", "tokenizer", "init_from without tokenizer files",
    train("sft", "--config.data.train_path={sft}", "--config.init_from={hf}"),
    ["{hf}", "tokenizer"], 1, hf_dir())
add("pretrained", "rlhf-jax import", "output directory not empty",
    ["import", "{hf}", "{wd}"], ["{wd}", "not empty", "will not overwrite"], 1, hf_dir())
add("pretrained", "rlhf-jax import", "source is not a GGUF file",
    ["import", "{bad}", "{tmp}/out"], "{bad}: not a GGUF file", 1, raw(b"junk", name="x.bin"))
add("pretrained", "rlhf-jax import", "source missing tensor",
    ["import", "{hf}", "{tmp}/out"], "missing tensor 'model.layers.0.input_layernorm.weight'", 1,
    hf_dir(drop=[L0 + "input_layernorm.weight"]))


# ----------------------------------------------------------------------------
# Fixtures: the valid inputs the bad ones are made from
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """Paths of valid inputs: tok (SentencePiece), sft / pairs / prompts JSONL, run (a real
  2-step SFT run with checkpoints), rm_run and ppo_run (runs of other model families)."""
  from rlhf_jax import launch
  from rlhf_jax.data import preferences, prompts, synthetic
  from rlhf_jax.tokenizer import train_sentencepiece
  root = str(tmp_path_factory.mktemp("assets"))
  env = {"sft": synthetic.write_task(f"{root}/sft.jsonl", "reverse", 64, 0, max_len=6),
         "pairs": preferences.write_synthetic_preferences(f"{root}/pairs.jsonl", "reverse", 64, 0),
         "prompts": prompts.write_synthetic_prompts(f"{root}/prompts.jsonl", "add", 64, 0,
                                                    digits=1)}
  corpus = f"{root}/corpus.txt"
  with open(corpus, "w") as f:
    f.write("user: reverse: abcdefghijkl\nassistant: lkjihgfedcba\nadd: 0123456789+=\n")
  train_sentencepiece([corpus], f"{root}/tok", vocab_size=40, model_type="char")
  env["tok"] = f"{root}/tok.model"
  run = f"{root}/run"
  argv = [fill(a, {**env, "wd": run}) for a in RESUME]
  try:
    launch.cli(argv)
  except SystemExit as e:
    raise AssertionError(f"the reference run failed: exit {e.code}") from None
  env["run"] = run
  env["rm_run"] = _other_family(run, f"{root}/rm_run", "rm")
  env["ppo_run"] = _other_family(run, f"{root}/ppo_run", "ppo")
  return env


def _other_family(run, dst, kind):
  """A copy of `run` whose checkpoint holds a reward model's {backbone, head} (kind rm) or
  PPO's {policy, value} parameters: what those trainers write, without training them."""
  import orbax.checkpoint as ocp
  from rlhf_jax.checkpoint import read_checkpoint
  from rlhf_jax.models.heads import backbone_params_from_lm
  shutil.copytree(run, dst, ignore=shutil.ignore_patterns("checkpoints"))
  step, state = read_checkpoint(os.path.join(run, "checkpoints"))
  lm = state["params"]
  head = {"kernel": np.zeros((lm["embed"]["embedding"].shape[1], 1), np.float32),
          "bias": np.zeros((1,), np.float32)}
  rm = {"backbone": backbone_params_from_lm(lm), "head": head}
  params = rm if kind == "rm" else {"policy": lm, "value": rm}
  mgr = ocp.CheckpointManager(os.path.join(dst, "checkpoints"),
                              item_handlers=ocp.StandardCheckpointHandler())
  mgr.save(step, args=ocp.args.StandardSave({"step": np.int32(step), "params": params}))
  mgr.wait_until_finished()
  mgr.close()
  return dst


def _prior_run(wd):
  """A workdir as an earlier run left it (no checkpoints: a new run would start over)."""
  os.makedirs(wd)
  with open(os.path.join(wd, "config.json"), "w") as f:
    f.write('{"trainer": "sft", "note": "an earlier launch"}\n')
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    f.write('{"step": 0, "eval_loss": 3.5}\n')
  with open(os.path.join(wd, "notes.txt"), "w") as f:
    f.write("user notes\n")


def snapshot(root):
  """{relative path: sha256} of every file under root."""
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      p = os.path.join(d, name)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def fill(text, env):
  """`text` with {name} replaced by env[name] (other braces, e.g. JSON, kept)."""
  return re.sub(r"\{(\w+)\}", lambda m: str(env.get(m.group(1), m.group(0))), text)


def run_cli(argv, capsys):
  """(exit status, stdout, stderr) of `rlhf-jax ARGV` run in this process."""
  from rlhf_jax import launch
  capsys.readouterr()
  try:
    launch.cli(list(argv))
    code = 0
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def _no_training(*args, **kwargs):
  raise AssertionError("the bad input was not refused before training started")


def prepare(case, tmp_path, assets):
  tmp = str(tmp_path)
  env = dict(assets, tmp=tmp, wd=os.path.join(tmp, "wd"))
  if case.workdir == "run":
    shutil.copytree(assets["run"], env["wd"])
  else:
    _prior_run(env["wd"])
  if case.setup:
    case.setup(tmp, env)
  return env


IN_PROCESS = [c for c in CASES if c.devices == 1]


@pytest.mark.parametrize("case", IN_PROCESS, ids=[c.id for c in IN_PROCESS])
def test_bad_input(case, tmp_path, assets, capsys, caplog, monkeypatch):
  from rlhf_jax.trainers import loop
  monkeypatch.delenv("RLHF_JAX_DEBUG", raising=False)
  monkeypatch.setattr(loop, "train_loop", _no_training)
  env = prepare(case, tmp_path, assets)
  before = snapshot(env["wd"])
  code, out, err = run_cli([fill(a, env) for a in case.argv], capsys)
  errors = [line for line in err.splitlines() if "error:" in line]
  assert "Traceback" not in out + err, err[-3000:]
  assert len(errors) == 1, f"exit {code}; stderr:\n{err[-3000:]}"
  line = errors[0]
  assert line.startswith("error: "), line
  for want in case.expect:
    assert fill(want, env) in line, f"{fill(want, env)!r} not in {line!r}"
  assert code == case.code, (code, line)
  logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
  assert not logged, f"errors logged besides the message: {[m[:300] for m in logged[:3]]}"
  after = snapshot(env["wd"])
  assert {k: after.get(k) for k in before} == before, "workdir files changed"
  new = sorted(k for k in set(after) - set(before) if not k.startswith("tfds/"))
  assert not new, f"new files: {new}"


# A few cases again as real processes: the exit status a shell sees, stderr as printed
# (absl / orbax logging included), and the cases that need 8 devices.
AS_PROCESS = ["config/wrong type/sft:num_steps=abc", "data/SFT JSONL/non-UTF-8 bytes",
              "checkpoint/resume/array data deleted"] + [c.id for c in CASES if c.devices > 1]


@pytest.mark.parametrize("case_id", AS_PROCESS)
def test_exit_status(case_id, tmp_path, assets):
  case = next(c for c in CASES if c.id == case_id)
  env = prepare(case, tmp_path, assets)
  before = snapshot(env["wd"])
  penv = {k: v for k, v in os.environ.items() if k not in ("RLHF_JAX_DEBUG", "RLHF_JAX_FAULT")}
  penv.update(JAX_PLATFORMS="cpu",
              XLA_FLAGS=xla_flags(case.devices))
  out = subprocess.run([sys.executable, "-m", "rlhf_jax.launch", *[fill(a, env) for a in case.argv]],
                       cwd=REPO, env=penv, capture_output=True, text=True, timeout=300)
  assert out.returncode == case.code, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if "error:" in line.lower()]
  assert len(errors) == 1 and errors[0].startswith("error: "), out.stderr[-3000:]
  for want in case.expect:
    assert fill(want, env) in errors[0], errors[0]
  assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
  assert snapshot(env["wd"]) == before


def test_no_pickle_and_no_deletion_of_user_files():
  """Issue #9, safe loading: nothing in the package unpickles (np.load always with
  allow_pickle=False; no pickle / torch.load / cloudpickle), and the only deletions are of
  files the program wrote itself (listed here; a new one must be added knowingly)."""
  root = os.path.join(REPO, "rlhf_jax")
  unsafe = re.compile(r"\bimport (cloud)?pickle\b|\bfrom (cloud)?pickle\b|torch\.load\(|"
                      r"pickle\.loads?\(|dill\.")
  delete = re.compile(r"shutil\.rmtree\(|os\.remove\(|os\.unlink\(|\.unlink\(|os\.rmdir\(|"
                      r"\.rmdir\(")
  deletions = []
  for d, _, files in os.walk(root):
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(d, name)
      rel = os.path.relpath(path, REPO)
      for lineno, line in enumerate(open(path, encoding="utf-8"), 1):
        code = line.split("#")[0]
        assert not unsafe.search(code), f"{rel}:{lineno}: {line.strip()}"
        if "np.load(" in code:
          assert "allow_pickle=False" in code, f"{rel}:{lineno}: np.load without allow_pickle=False"
        if delete.search(code):
          deletions.append((rel, code.strip()))
  assert sorted(deletions) == [
      # ComputeCounters at step 0: WORKDIR/compute_counters.jsonl of an earlier launch of the
      # same workdir that never checkpointed (a file the trainer itself writes)
      ("rlhf_jax/flops.py", "os.remove(self.path)"),
      # export --overwrite: a stale shard index in the output directory it was told to replace
      ("rlhf_jax/models/pretrained.py",
       '(path / "model.safetensors.index.json").unlink(missing_ok=True)'),
      # Pipeline.save: WORKDIR/rollout_queue/step_<n>.npz of a step no checkpoint keeps (only
      # names matching step_<n>.npz in the queue directory the trainer writes)
      ("rlhf_jax/rollout_pipeline.py", "os.remove(os.path.join(self.dir, name))"),
      # _remove_own_lora_files: WORKDIR/lora/{base,config.json} of an earlier launch that
      # never checkpointed (a lora/ dir with anything else is refused)
      ("rlhf_jax/trainers/state.py", "shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)"),
  ], deletions


def test_corpus_size():
  """The issue asks for >= 200 cases; the README's Troubleshooting section lists them."""
  assert len(CASES) >= 200, len(CASES)
  assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
  assert {c.category for c in CASES} == {"config", "data", "checkpoint", "pretrained"}


def counts():
  """{category: {group: n}} of CASES."""
  out: dict = {}
  for c in CASES:
    out.setdefault(c.category, {}).setdefault(c.group, 0)
    out[c.category][c.group] += 1
  return out


if __name__ == "__main__":  # python tests/test_bad_inputs.py: the counts for the README
  for category, groups in counts().items():
    print(f"{category}: {sum(groups.values())}  " +
          ", ".join(f"{g} {n}" for g, n in groups.items()))
  print(f"total: {len(CASES)}")
