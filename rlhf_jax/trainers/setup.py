"""A run's set-up every trainer shares: tokenizer, initial policy, checkpointer + resume +
the workdir files."""
from __future__ import annotations

import os
from typing import Callable, Iterable

from rlhf_jax import allocator
from rlhf_jax import checkpoint as ckpt_lib
from rlhf_jax import config as config_lib
from rlhf_jax import evaluation
from rlhf_jax import parallel
from rlhf_jax import rewards as rewards_lib
from rlhf_jax import workdir as workdir_lib
from rlhf_jax.trainers import state as state_lib


def restore_or_keep(checkpointer: ckpt_lib.Checkpointer, state, shardings):
  """(start_step, state): the latest checkpoint if there is one, else (0, state). A LoRA
  state's frozen base is not in checkpoints (`state_lib.checkpointed`): kept as it is."""
  restored = checkpointer.restore(ckpt_lib.abstract_like(state_lib.checkpointed(state),
                                                         state_lib.checkpointed(shardings)))
  if restored is None:
    return 0, state
  step, saved = restored
  return int(step), {**state, **saved}


def open_run(config, workdir: str, state, shardings, model_config, tokenizer, extra=None):
  """Checkpointer + resume + the workdir files every trainer writes: (checkpointer, start, state).

  Restores the latest checkpoint if there is one (refusing one that does not fit,
  before anything is written), then writes config.json, model_config.json, the
  tokenizer, and `extra` {filename: json-able}.
  """
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       config.checkpoint.every, config.checkpoint.keep,
                                       config.checkpoint.async_save)
  start, state = restore_or_keep(checkpointer, state, shardings)
  if start and parallel.is_primary():
    print(f"resumed from step {start}", flush=True)
  if parallel.is_primary():  # multi-host: one writer for the shared workdir files
    workdir_lib.prepare_workdir(workdir, config)
    workdir_lib.save_json(os.path.join(workdir, "model_config.json"), model_config.to_dict())
    tokenizer.save(workdir)  # the workdir is self-contained: a later run can init_from it
    for name, obj in (extra or {}).items():
      workdir_lib.save_json(os.path.join(workdir, name), obj)
  parallel.sync("open_run")
  # The host copy of pretrained weights (and start-up temporaries) is freed by now: its
  # pages go back to the OS instead of staying in RSS under the tuned malloc settings.
  allocator.release_free_memory()
  return checkpointer, start, state


def build_tokenizer(config, workdir: str, examples: Callable[[], Iterable]):
  """config.tokenizer.path, else init_from's tokenizer, else train SentencePiece.

  `examples()` yields (prompt messages, completion text) pairs; a trained
  tokenizer learns from them rendered as the model will see them (chat
  template + completion). It is kept as WORKDIR/tokenizer.model so that a
  resumed run uses the exact same vocabulary.
  """
  from rlhf_jax import tokenizer as tok_lib
  t = config.tokenizer
  style = t.chat_style or None
  if t.path or config.init_from:
    return tok_lib.load_tokenizer(t.path or config.init_from, chat_style=style)
  with parallel.primary_first("build_tokenizer"):  # multi-host: process 0 trains it
    return _train_or_load_tokenizer(t, style, workdir, examples)


def _train_or_load_tokenizer(t, style, workdir, examples):
  from rlhf_jax import tokenizer as tok_lib
  prefix = os.path.join(workdir, "tokenizer")
  if os.path.exists(prefix + ".model"):
    return tok_lib.load_tokenizer(prefix + ".model", chat_style=style or "plain")
  corpus = prefix + "_corpus.txt"
  with open(corpus, "w") as f:
    for msgs, completion in examples():
      f.write(tok_lib.render_chat(msgs, style or "plain") + completion + "\n")
  # Trained under a temporary name, then renamed: a run killed mid-training never leaves a
  # truncated tokenizer.model that its resumed run would load.
  tmp = f"{prefix}.tmp{os.getpid()}"
  tok_lib.train_sentencepiece([corpus], tmp, vocab_size=t.vocab_size, model_type=t.model_type)
  os.replace(tmp + ".vocab", prefix + ".vocab")
  os.replace(tmp + ".model", prefix + ".model")
  return tok_lib.load_tokenizer(prefix + ".model", chat_style=style or "plain")


def policy_init(config, tokenizer, families=("language model",)):
  """(ModelConfig, params or None): from config.init_from (see `load_init`; a run workdir
  must hold one of `families`), else the architecture in config.model with the
  tokenizer's vocabulary (random init)."""
  if config.init_from:
    mcfg, params = workdir_lib.load_init(config.init_from, config.model.dtype, config.model.remat,
                             config.model.remat_policy, families,
                             attention=config.model.attention,
                             logits_chunk=config.model.logits_chunk)
  else:
    mcfg, params = config_lib.model_config(config, vocab_size=tokenizer.vocab_size), None
  if mcfg.vocab_size < tokenizer.vocab_size:
    raise config_lib.ConfigError(f"model vocab_size={mcfg.vocab_size} is smaller than the "
                                 f"tokenizer's vocabulary ({tokenizer.vocab_size})")
  return mcfg, params


def reward_fn_from_config(config):
  """The CombinedReward of config.reward.spec (a name, or a JSON list/dict of entries); None
  for an empty spec (allowed with rollout.env: the environment's rewards alone)."""
  if not config.reward.spec:
    return None
  return rewards_lib.make_reward_fn(config.reward.spec)


def policy_eval(config, model_config, tokenizer, source, workdir, ref_params):
  """evaluate(params, step) -> dict on the first `eval_prompts` held-out prompts
  (`rlhf_jax.evaluation`: greedy reward components under config.eval_reward_spec or
  config.reward.spec, eval_accuracy, eval_kl to `ref_params`, capability metrics);
  None without held-out prompts or a capability set."""
  examples = None
  if source is not None:
    examples = [source[i] for i in range(min(config.eval_prompts, len(source)))]
  return evaluation.from_config(
      config, model_config=model_config, tokenizer=tokenizer, ref_params=ref_params,
      workdir=workdir, prompt_examples=examples, max_prompt_len=config.data.max_prompt_len,
      max_new_tokens=config.rollout.max_new_tokens, reward_spec=config.reward.spec,
      episode=episode_config(config))


def episode_config(config):
  """The run's `rollout_multiturn.EpisodeConfig` (rollout.env), None for single-turn runs."""
  from rlhf_jax import rollout_multiturn
  return rollout_multiturn.episode_config(config.rollout) if "rollout" in config else None
