"""The config defaults: `base_config(trainer)` and its section builders.

`base_config` holds every knob's default (the tiny CPU run) with a comment per knob;
`configs/<algo>.py` presets change what they need. `rlhf_jax.config` re-exports
`base_config` and validates the result.
"""
from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict

from rlhf_jax.models.transformer import ModelConfig


def base_config(trainer: str) -> ConfigDict:
  c = ConfigDict()
  c.trainer = trainer          # which rlhf_jax.trainers.<name>.run to call
  c.seed = 0                   # parameter init, data order and sampling all derive from it
  c.init_from = ""             # HF dir / .gguf / `rlhf-jax import` dir; "" = random init

  # Model architecture (ignored when init_from is set, except dtype and remat).
  m = dataclasses.asdict(ModelConfig())
  m.update(vocab_size=0,       # 0 = the tokenizer's vocabulary size
           d_model=96, n_layers=4, n_heads=6, n_kv_heads=2, head_dim=16, d_ff=256,
           max_seq_len=64, rope_scaling=())  # () = no RoPE scaling
  c.model = ConfigDict(m)

  c.tokenizer = ConfigDict(dict(
      path="",                 # .model / tokenizer dir / .gguf; "" = init_from's, else train one
      vocab_size=48,           # when training a SentencePiece model on the training data
      model_type="bpe",        # SentencePiece model type: bpe | unigram | char
      chat_style="",           # plain | chatml | llama3 | "" = the tokenizer's own (else plain)
  ))

  if trainer == "sft":
    c.data = sft_data_config()
  elif trainer in ("grpo", "ppo"):
    c.data = prompt_data_config()
    c.rollout = rollout_config()
    c.reward = ConfigDict(dict(
        spec="math",           # reward functions: a name, or JSON like
                               # '[{"name": "math"}, {"name": "missing_eos", "weight": 0.5}]'
                               # (see rlhf_jax/rewards/__init__.py)
    ))
    c.eval_prompts = 128       # held-out prompts decoded greedily at each eval
    c.data.synthetic_digits = 1
    c.rollout.max_new_tokens = 4
  elif trainer == "prm":
    c.data = prm_data_config()
  else:
    c.data = preference_data_config()

  c.batch_size = 32            # global batch (rows) per optimizer step
  c.grad_accum_steps = 1       # micro-batches per step; batch_size must divide evenly
  c.num_steps = 400            # optimizer steps
  c.max_bad_steps = 3          # stop after this many non-finite (NaN/Inf) updates IN A ROW;
                               # each one is skipped (params and optimizer state kept) and
                               # counted in skipped_updates; 0 = never stop

  c.optimizer = ConfigDict(dict(
      lr=3e-3,                 # peak learning rate (AdamW)
      warmup_steps=40,         # linear warmup from 0
      final_lr_ratio=0.1,      # cosine decay to lr * final_lr_ratio at num_steps
      b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.01,       # decoupled; not applied to norms and biases
      grad_clip_norm=1.0,      # global-norm clipping; 0 = off
  ))

  c.mesh = ConfigDict(dict(
      shape=(-1, 1, 1),        # (data, fsdp, tensor); -1 = fill over ALL processes'
                               # devices (jax.devices())
      planned_for="",          # the hardware a size preset planned mesh.shape for (set by
                               # rlhf_jax/presets.py); "" = none
  ))
  c.hardware = "auto"          # auto: mesh.shape when it fits the devices present, else (a
                               # size preset's mesh planned for other hardware) data
                               # parallelism over them, said in one printed line; a name of
                               # rlhf_jax/hardware.py HARDWARE (v5e-8 | v5p-32 | 8xH100): the
                               # devices must be that hardware's (the preset's mesh re-planned
                               # for it)

  # Multi-host (JAX multi-controller runtime; rlhf_jax/parallel.py:initialize_distributed).
  c.distributed = ConfigDict(dict(
      enabled=False,           # call jax.distributed.initialize before anything touches jax
      coordinator_address="",  # "host:port" of process 0; "" = auto-detect (TPU VM, SLURM,
                               # Open MPI) or $RLHF_JAX_COORDINATOR_ADDRESS
      num_processes=0,         # 0 = auto-detect or $RLHF_JAX_NUM_PROCESSES
      process_id=-1,           # -1 = auto-detect or $RLHF_JAX_PROCESS_ID
      cpu_collectives="",      # CPU only: "gloo" for cross-process collectives ("" = JAX's default)
  ))

  # LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models";
  # rlhf_jax/models/lora.py): W' = W + (alpha / rank) * A @ B on the target projections.
  c.lora = ConfigDict(dict(
      rank=0,                  # 0 = off (full fine-tuning); e.g. 8
      alpha=16.0,              # scale = alpha / rank
      dropout=0.0,             # dropout on the adapter input (training only)
      target_modules=("q", "k", "v", "o"),  # of q k v o gate up down
      trainable=(),            # other top-level params trained fully, e.g. ("head",) for a
                               # reward/value head (a scalar head is always trained)
  ))

  c.log_every = 20             # steps between metrics.jsonl / TensorBoard rows
  c.logging = ConfigDict(dict(   # optional metric sinks besides metrics.jsonl + TensorBoard
      wandb_project="",        # Weights & Biases project ("" = off; pip install 'rlhf_jax[wandb]')
      wandb_entity="",         # W&B entity (team / user); "" = the default one
      wandb_name="",           # run name; "" = the workdir's name
      wandb_mode="online",     # online | offline (files under WORKDIR/wandb) | disabled
  ))
  c.eval_every = 100           # steps between eval loss (and samples); 0 = never
  c.eval_at_start = True       # also evaluate before the first step (step 0; a run that
                               # starts fresh) when eval_every > 0
  c.eval_at_end = True         # also evaluate at the last step (num_steps) when eval_every
                               # > 0, even if it is not a multiple of eval_every
  c.eval_batches = 8           # max eval batches per evaluation

  c.checkpoint = ConfigDict(dict(
      every=100,               # steps between checkpoints (always one at the end)
      keep=3,                  # newest checkpoints kept
      async_save=True,         # write in a background thread
  ))
  if trainer in ("grpo", "ppo"):  # online-RL defaults: the tiny CPU runs
    c.num_steps = 120
    c.optimizer.update(lr=3e-4, warmup_steps=0, final_lr_ratio=1.0, weight_decay=0.0)
    c.log_every = 5
    c.eval_every = 20
    c.checkpoint.every = 20
  if trainer != "reward_model":  # policy evaluation (rlhf_jax/evaluation.py)
    c.eval_kl = True           # also sample eval completions (T=1): eval_kl = KL(pi || initial
                               # policy) per sequence, eval_sampled_reward/<label>
    c.eval_samples = 4         # sampled completions per eval prompt (eval_kl, eval_sampled_*)
    c.eval_seed = 0            # eval sampling key = f(eval_seed) only, NOT the run's seed or
                               # step: all evals share it (common random numbers)
    c.eval_reward_spec = ""    # rewards scoring eval completions, e.g. gold + proxy:
                               # '[{"name": "math", "label": "gold"}, {"name": "reward_model",
                               # "label": "proxy", "workdir": "runs/rm"}]'; "" = reward.spec
                               # (RL) / "math" (SFT, DPO)
    c.capability = ConfigDict(dict(
        path="",               # JSONL {"prompt","completion"} of a skill NOT optimised (the
                               # alignment tax): capability_nll, capability_exact_match
        num_examples=128,      # first rows used
        max_new_tokens=16,     # greedy decoding budget for exact match
    ))
  if trainer in ("sft", "dpo"):
    c.prompt_eval = ConfigDict(dict(
        path="",               # JSONL {"prompt","answer"} held-out prompts decoded at each
                               # eval (eval_reward/*, eval_accuracy, eval_kl); "" = off
        num_prompts=128,
        max_prompt_len=16,     # prompts LEFT-truncated / left-padded to this many tokens
        max_new_tokens=8,
    ))
  if trainer != "reward_model":
    c.sample = ConfigDict(dict(
        every=100,               # steps between samples.jsonl dumps; 0 = never
        num_prompts=4,           # eval prompts sampled each time
        max_new_tokens=16,
        temperature=0.0,         # 0 = greedy
    ))
    if trainer in ("grpo", "ppo"):
      c.sample.num_prompts = 8
  return c


def sft_data_config() -> ConfigDict:
  return ConfigDict(dict(
      source="jsonl",          # jsonl: the rows below | gsm8k_tools: train/eval_path are official
                               # GSM8K files, turned into calculator tool-use transcripts
                               # (rlhf_jax/envs/transcripts.py)
      train_path="",           # JSONL {"prompt","completion"} or {"messages"}; "" = synthetic
      eval_path="",            # JSONL in the same format; "" = synthetic (or none)
      synthetic_task="reverse",  # reverse | sort | add (rlhf_jax/data/synthetic.py) |
                               # guess_number | calc_chain (multi-turn transcripts played
                               # through rlhf_jax/envs; rlhf_jax/envs/transcripts.py)
      synthetic_max_len=8,     # reverse/sort: string length 3..max_len; add: max_len/2 digits
      synthetic_digits=1,      # guess_number / calc_chain difficulty (as in RL prompt sets)
      synthetic_train_examples=4000,
      synthetic_eval_examples=256,
      max_seq_len=32,          # tokens per row (prompt + completion + BOS/EOS)
      overlength="error",      # error | truncate | drop: what to do with longer examples
      packing=False,           # pack several examples per row (segment-masked attention)
      loss_on_prompt=False,    # True: loss on every token after BOS (LM pre-training on the
                               # rendered text), not only the completion
      pad_to="max",            # max | longest | bucket: the length each batch is padded to
                               # (rlhf_jax/data/lengths.py): max = the configured maximum (one
                               # shape); longest = the batch's longest row (a compilation per
                               # length); bucket = the smallest data.buckets boundary >= it
      buckets=(),              # pad_to=bucket boundaries in tokens, increasing; () = chosen
                               # from the training rows' lengths (about 4; the maximum added)
      pad_multiple=8,          # longest / chosen buckets: lengths rounded up to a multiple
  ))


def prompt_data_config() -> ConfigDict:
  """Prompts (with optional reference answers) for online RL."""
  return ConfigDict(dict(
      source="synthetic",      # synthetic | jsonl | gsm8k
      train_path="",           # jsonl: {"prompt", "answer"?}; gsm8k: official {"question","answer"}
      eval_path="",            # held-out prompts of the same kind ("" = none / synthetic)
      data_dir="",             # TFDS data_dir ("" = WORKDIR/tfds)
      synthetic_task="add",    # add | arithmetic | word (rlhf_jax/data/synthetic.py)
      synthetic_digits=2,      # operand digits (difficulty)
      synthetic_train_examples=4000,
      synthetic_eval_examples=256,
      max_prompt_len=16,       # prompts LEFT-truncated, left-padded to this length
      skip_malformed=False,
  ))


def rollout_config() -> ConfigDict:
  return ConfigDict(dict(
      prompts_per_step=16,     # prompts per RL step
      group_size=8,            # completions sampled per prompt (G)
      max_new_tokens=8,        # generation budget per completion
      stop_at_eos=True,        # stop a completion at the tokenizer's EOS; False: every
                               # completion runs to max_new_tokens (EOS is an ordinary token)
      temperature=1.0,         # sampling temperature (also used for the policy's log-probs)
      top_k=0,                 # 0 = off
      top_p=1.0,               # 1 = off
      generate_micro_batch=128,  # rows per sampler call (divides prompts_per_step*group_size)
      sampler="static",          # static: `sampling.generate` per micro-batch (decodes until
                                 # its longest row stops); continuous: decode slots refilled
                                 # as rows stop (`sampling_continuous`; same samples)
      decode_slots=0,            # continuous: rows decoded at once (0 = generate_micro_batch)
      logprob_micro_batch=128,   # rows per old/ref log-prob forward pass
      train_micro_batch=0,       # rows per gradient micro-batch in an update (0 = the whole
                                 # minibatch); gradients are accumulated exactly
      is_correction="none",      # sampler/trainer mismatch correction of the policy loss
                                 # (rlhf_jax/losses/is_correction.py): none | tis (truncated
                                 # IS, w = min(rho, C)) | mis (masked IS, w = rho in [1/C, C]
                                 # else 0), rho = pi_old / pi_sampler
      is_cap=2.0,                # C > 1 (Yao et al. 2025 use 2)
      is_level="token",          # token | sequence (rho of the whole completion, every token)
      max_staleness=0,           # k: the rollout of step t is sampled by the policy of step
                                 # max(0, t - k), in a background thread while the update runs
                                 # (rlhf_jax/rollout_pipeline.py); 0 = synchronous
      devices=0,                 # devices that only sample (the last ones; the others train,
                                 # config.mesh.shape on them); 0 = all devices do both
  ))


def preference_data_config() -> ConfigDict:
  """Pairwise preference data (reward models, the DPO family)."""
  return ConfigDict(dict(
      source="synthetic",      # synthetic | jsonl | hh_rlhf
      train_path="",           # jsonl: {"prompt","chosen","rejected"[,"margin"]} file;
                               # hh_rlhf: a .jsonl(.gz) file or a dir with <subset>/<split>.jsonl.gz
      eval_path="",            # held-out pairs, same kind as train_path ("" = none / synthetic)
      hh_subset="harmless-base",  # hh_rlhf: which subset directory under train_path
      data_dir="",             # TFDS data_dir for built datasets; "" = WORKDIR/tfds
      synthetic_task="reverse",  # synthetic: chosen = correct answer, rejected = corrupted
      synthetic_corruption="random",  # random: another string of the same length; swap:
                                      # two characters swapped (harder to tell apart)
      synthetic_train_examples=4000,
      synthetic_eval_examples=256,
      max_prompt_len=24,       # prompts are LEFT-truncated to this many tokens
      max_completion_len=12,   # completions are RIGHT-truncated (EOS dropped when cut)
      skip_malformed=False,    # False: a bad row stops with file:line; True: skip and count
      pad_to="max",            # max | longest | bucket: the length each batch is padded to
                               # (rlhf_jax/data/lengths.py): max = the configured maximum (one
                               # shape); longest = the batch's longest row (a compilation per
                               # length); bucket = the smallest data.buckets boundary >= it
      buckets=(),              # pad_to=bucket boundaries in tokens, increasing; () = chosen
                               # from the training rows' lengths (about 4; the maximum added)
      pad_multiple=8,          # longest / chosen buckets: lengths rounded up to a multiple
  ))


def prm_data_config() -> ConfigDict:
  """Step-labelled solutions for the process reward model (rlhf_jax/data/prm.py)."""
  return ConfigDict(dict(
      source="gsm8k",          # gsm8k: official {"question","answer"} files, steps labelled by
                               # checking the <<expr=value>> annotations, plus corrupted copies;
                               # jsonl: {"prompt","steps","labels"} rows
      train_path="",           # the train file of `source`
      eval_path="",            # held-out file of the same kind ("" = none)
      max_train_examples=0,    # first solutions used (0 = all)
      max_eval_examples=0,
      corrupt=True,            # gsm8k: add a corrupted copy of every solution (the negatives)
      max_prompt_len=32,       # prompts LEFT-truncated to this many tokens
      max_len=128,             # tokens per row (prompt + steps); steps ending beyond are dropped
      pad_to="max",            # max | longest | bucket: the length each batch is padded to
                               # (rlhf_jax/data/lengths.py): max = the configured maximum (one
                               # shape); longest = the batch's longest row (a compilation per
                               # length); bucket = the smallest data.buckets boundary >= it
      buckets=(),              # pad_to=bucket boundaries in tokens, increasing; () = chosen
                               # from the training rows' lengths (about 4; the maximum added)
      pad_multiple=8,          # longest / chosen buckets: lengths rounded up to a multiple
  ))
