"""Multi-turn and tool-use RL on the tiny CPU model (experiments/multiturn).

Presets (`--config=configs/multiturn.py:PRESET`), each one stage of the experiment:
  guess_sft   SFT on guess_number games in 1-8 (--config.data.train_path=
              experiments/multiturn/prepare.py's guess_sft.jsonl: half played by a player
              that ignores the feedback, half by one that guesses in the range still possible)
  guess       GRPO with rollout.env=guess_number (secret in 1-8, 4 guesses, 0.1 per extra
              guess) from a guess_sft run (--config.init_from=...; data.train_path /
              eval_path: prepare.py's guess prompts)
  calc_sft    SFT on "calc: 4+7*1" rows, part of them calculator transcripts
              (--config.data.train_path=experiments/multiturn/prepare.py's calc_sft.jsonl)
  calc        GRPO with rollout.env=calculator from a calc_sft run (--config.init_from,
              --config.data.train_path / eval_path: prepare.py's prompts)
The episode budget rollout.max_new_tokens holds model and env tokens; the loss and the
lengths count model tokens only (README "Multi-turn and tool use — rollouts").
"""
import json
import os

from ml_collections import ConfigDict

HERE = os.path.dirname(os.path.abspath(__file__))

GUESS_ENV = {"name": "guess_number", "hi": 8, "max_guesses": 4, "turn_cost": 0.1}
CALC_ENV = {"name": "calculator", "max_tool_calls": 2}


def _sft(c: ConfigDict) -> ConfigDict:
  c.update(eval_every=0, sample=ConfigDict(dict(c.sample.to_dict(), every=0)))
  c.checkpoint.every = c.num_steps
  return c


def _grpo(c: ConfigDict, env: dict) -> ConfigDict:
  c.rollout.update(env=json.dumps(env), prompts_per_step=8, group_size=8)
  c.reward.spec = ""          # the env's rewards alone
  c.data.update(source="jsonl", max_prompt_len=16)
  c.update(num_steps=40, eval_every=20)
  c.checkpoint.every = 20
  return c


def get_config(preset: str = "guess") -> ConfigDict:
  from rlhf_jax.config import base_config
  if preset == "guess_sft":
    c = base_config("sft")
    c.data.update(max_seq_len=64, eval_path="")
    c.tokenizer.vocab_size = 64
    c.num_steps = 200
    return _sft(c)
  if preset == "calc_sft":
    c = base_config("sft")
    c.data.update(max_seq_len=64, eval_path="")
    c.model.max_seq_len = 96
    c.tokenizer.vocab_size = 80
    c.num_steps = 300
    return _sft(c)
  from rlhf_jax.config_keys import load_config
  c = load_config(os.path.join(HERE, "grpo.py:tiny"))  # the GRPO section and its defaults
  if preset == "guess":  # 8 eval prompts: one per secret (greedy: one episode each)
    c.rollout.update(max_new_tokens=40, max_tokens_per_turn=4, max_turns=4)
    c = _grpo(c, GUESS_ENV)
    c.update(eval_prompts=8, eval_samples=16, num_steps=60)
    return c
  if preset == "calc":
    c.rollout.update(max_new_tokens=32, max_tokens_per_turn=16, max_turns=3)
    c.update(eval_prompts=64, eval_samples=2)
    return _grpo(c, CALC_ENV)
  raise ValueError(f"unknown multiturn preset {preset!r}; expected guess_sft, guess, calc_sft, "
                   f"calc")
