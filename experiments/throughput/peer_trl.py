"""TRL (PyTorch) side of the peer throughput harness (issue #7).

Runs in the TRL peer venv (`.peers/trl/bin/python`, made by setup_peers.sh), never in
the project venv:

  .peers/trl/bin/python experiments/throughput/peer_trl.py --workload=sft [--steps=10]
      [--warmup=3] [--out=result.json]

Does exactly the work of `spec.py` with TRL's own trainers (SFTTrainer / DPOTrainer /
GRPOTrainer): a randomly initialised LlamaForCausalLM at the spec (saved to a temporary
directory and handed to the trainer by path, the way TRL loads models, so that it
builds the reference model itself), random token ids, AdamW lr 1e-5 constant, fp32, no
gradient checkpointing, no eval / checkpoints / logging. Each optimizer step is timed by
wall clock in a TrainerCallback; the median over the timed steps (after warm-up) is
reported. One JSON line on stdout (prefixed `PEER_RESULT `) and --out.
"""

import os
import platform
import statistics
import sys
import tempfile
import time

# Nothing may reach the network (no hub look-ups, no telemetry, no trackers).
for _k, _v in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1", WANDB_DISABLED="true",
                   WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false").items():
  os.environ.setdefault(_k, _v)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec  # noqa: E402  (plain-python spec shared with our suite)

PAD, BOS, EOS, UNK = 0, 1, 2, 3   # special ids; data ids are uniform over [FIRST_DATA_ID, vocab)
FIRST_DATA_ID = 4
# special tokens get names that are no substring of a data word ('t17'): a tokenizer
# matches added/special tokens inside the text before it splits on whitespace
SPECIAL_NAMES = {PAD: "<pad>", BOS: "<bos>", EOS: "<eos>", UNK: "<unk>"}


def _name(i):
  return SPECIAL_NAMES.get(int(i), f"t{int(i)}")


def _words(ids):
  return " ".join(_name(i) for i in ids)


def make_tokenizer(vocab_size):
  """A word-level tokenizer over 't4'..'t{V-1}' (token 'tK' <-> id K) and four specials, so that TRL's text
  paths (DPO dataset preparation at init, GRPO prompt tokenisation and completion
  decoding) cost next to nothing and map one word to one id."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  tk = Tokenizer(models.WordLevel(vocab={_name(i): i for i in range(vocab_size)},
                                  unk_token=SPECIAL_NAMES[UNK]))
  tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=SPECIAL_NAMES[PAD],
                                 bos_token=SPECIAL_NAMES[BOS], eos_token=SPECIAL_NAMES[EOS],
                                 unk_token=SPECIAL_NAMES[UNK])


def build_model_dir(tmp, seed):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  m = spec.MODEL
  cfg = LlamaConfig(
      vocab_size=m["vocab_size"], hidden_size=m["d_model"], intermediate_size=m["d_ff"],
      num_hidden_layers=m["n_layers"], num_attention_heads=m["n_heads"],
      num_key_value_heads=m["n_kv_heads"], head_dim=m["head_dim"], hidden_act="silu",
      rms_norm_eps=m["norm_eps"], rope_theta=m["rope_theta"],
      tie_word_embeddings=m["tie_embeddings"], attention_bias=False, mlp_bias=False,
      attention_dropout=0.0, max_position_embeddings=512,
      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, dtype="float32")
  torch.manual_seed(seed)
  model = LlamaForCausalLM(cfg).to(torch.float32)
  n = sum(p.numel() for p in model.parameters())
  if n != spec.num_params():
    raise SystemExit(f"model has {n} parameters, spec says {spec.num_params()}")
  path = os.path.join(tmp, "model")
  model.save_pretrained(path)
  tok = make_tokenizer(m["vocab_size"])
  tok.save_pretrained(path)
  return path, tok, n


def common_args(cls, out_dir, steps, **kw):
  o = spec.OPTIMIZER
  return cls(
      output_dir=out_dir, max_steps=steps, learning_rate=o["lr"], lr_scheduler_type="constant",
      warmup_steps=0, adam_beta1=o["b1"], adam_beta2=o["b2"], adam_epsilon=o["eps"],
      weight_decay=o["weight_decay"], max_grad_norm=o["grad_clip_norm"], optim="adamw_torch",
      gradient_accumulation_steps=1, bf16=False, fp16=False, gradient_checkpointing=False,
      use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
      logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
      model_init_kwargs={"dtype": "float32"}, **kw)


class StepTimer:
  """TrainerCallback-compatible timer (built lazily so transformers is imported late)."""

  def __init__(self):
    from transformers import TrainerCallback

    outer = self
    self.begin, self.end, self.train_begin = [], [], None

    class _CB(TrainerCallback):
      def on_train_begin(self, args, state, control, **kw):
        outer.train_begin = time.perf_counter()

      def on_step_begin(self, args, state, control, **kw):
        outer.begin.append(time.perf_counter())

      def on_step_end(self, args, state, control, **kw):
        outer.end.append(time.perf_counter())

    self.callback = _CB()

  def summary(self, warmup):
    ends = [self.train_begin] + self.end
    intervals = [b - a for a, b in zip(ends[:-1], ends[1:])][warmup:]     # step end to step end
    inside = [e - b for b, e in zip(self.begin, self.end)][warmup:]        # step begin to step end
    return intervals, inside


def run(workload, steps, warmup, seed=0):
  import numpy as np
  import torch
  import datasets
  import transformers
  import trl
  torch.set_num_threads(2)
  torch.manual_seed(seed)
  w = spec.WORKLOADS[workload]
  V = spec.MODEL["vocab_size"]
  rng = np.random.default_rng(seed)
  total = warmup + steps
  timer = StepTimer()
  extra = {}
  with tempfile.TemporaryDirectory(prefix="peer_trl_") as tmp:
    path, tok, n_params = build_model_dir(tmp, seed)
    out_dir = os.path.join(tmp, "out")
    if workload == "sft":
      B, T = w["batch_size"], w["seq_len"]
      ids = rng.integers(FIRST_DATA_ID, V, size=(B * total, T))
      ds = datasets.Dataset.from_dict({"input_ids": ids.tolist()})   # pre-tokenised, LM rows
      args = common_args(trl.SFTConfig, out_dir, total, per_device_train_batch_size=B,
                         max_length=T, packing=False, padding_free=False,
                         completion_only_loss=False, shuffle_dataset=False)
      trainer = trl.SFTTrainer(model=path, args=args, train_dataset=ds, processing_class=tok,
                               callbacks=[timer.callback])
      tokens_per_step, seq = B * T, T
      flops_per_step = spec.train_flops(tokens_per_step, seq)
    elif workload == "dpo":
      B, P, C = w["pairs"], w["prompt_len"], w["completion_len"]
      n = B * total
      prompts = rng.integers(FIRST_DATA_ID, V, size=(n, P))
      # completions end on EOS so that TRL's add-EOS step leaves them at exactly C tokens
      chosen = np.concatenate([rng.integers(FIRST_DATA_ID, V, size=(n, C - 1)),
                               np.full((n, 1), EOS)], axis=1)
      rejected = np.concatenate([rng.integers(FIRST_DATA_ID, V, size=(n, C - 1)),
                                 np.full((n, 1), EOS)], axis=1)
      ds = datasets.Dataset.from_dict({
          "prompt": [_words(r) for r in prompts],
          "chosen": [" " + _words(r) for r in chosen],
          "rejected": [" " + _words(r) for r in rejected]})
      args = common_args(trl.DPOConfig, out_dir, total, per_device_train_batch_size=B,
                         beta=w["beta"], loss_type=["sigmoid"], max_length=P + C,
                         precompute_ref_log_probs=False, padding_free=False)
      trainer = trl.DPOTrainer(model=path, args=args, train_dataset=ds, processing_class=tok,
                               callbacks=[timer.callback])
      row = trainer.train_dataset[0]
      if (len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"])) != (P, C, C):
        raise SystemExit(f"DPO rows tokenised to {len(row['prompt_ids'])}/{len(row['chosen_ids'])}"
                         f"/{len(row['rejected_ids'])} tokens, want {P}/{C}/{C}")
      tokens_per_step, seq = B * 2 * (P + C), P + C
      # policy forward+backward on chosen+rejected, reference forward on the same rows
      flops_per_step = spec.train_flops(tokens_per_step, seq) + spec.forward_flops(tokens_per_step, seq)
    elif workload == "grpo":
      Np, G, P, N = w["prompts"], w["group_size"], w["prompt_len"], w["max_new_tokens"]
      prompts = rng.integers(FIRST_DATA_ID, V, size=(Np * total, P))
      ds = datasets.Dataset.from_dict({"prompt": [_words(r) for r in prompts]})

      def even_fraction(completions, completion_ids, **kw):
        return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]

      args = common_args(
          trl.GRPOConfig, out_dir, total, per_device_train_batch_size=Np * G, num_generations=G,
          steps_per_generation=1, num_iterations=w["num_iterations"], beta=w["beta"],
          max_completion_length=N, temperature=1.0, top_p=1.0, top_k=0,
          # exactly N new tokens: EOS is masked out until N tokens are generated
          generation_kwargs={"min_new_tokens": N}, shuffle_dataset=False,
          log_completions=False, use_vllm=False)
      trainer = trl.GRPOTrainer(model=path, reward_funcs=even_fraction, args=args,
                                train_dataset=ds, processing_class=tok,
                                callbacks=[timer.callback])
      gen_times, gen_lens = [], []
      model = trainer.model
      orig_generate = model.generate

      def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = orig_generate(*a, **kw)
        gen_times.append(time.perf_counter() - t0)
        gen_lens.append(int(out.shape[1] - kw["input_ids"].shape[1]))
        return out

      model.generate = timed_generate
      extra["ref_model"] = trainer.ref_model is not None
      extra["loss_type"] = args.loss_type
      tokens_per_step, seq = Np * G * (P + N), P + N
      extra["generated_tokens_per_step"] = Np * G * N
      # update (fwd+bwd) + the reference forward over prompt+completion; generation apart
      flops_per_step = spec.train_flops(tokens_per_step, seq) + spec.forward_flops(tokens_per_step, seq)
    else:
      raise SystemExit(f"unknown workload {workload!r}")

    attn = trainer.model.config._attn_implementation
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    opt_name = f"{type(opt).__module__}.{type(opt).__name__}"
    opt_defaults = {k: v for k, v in opt.defaults.items() if k in ("betas", "eps", "fused", "foreach")}
    opt_defaults["lr"] = sorted({g["lr"] for g in opt.param_groups})
    opt_defaults["weight_decay"] = sorted({g["weight_decay"] for g in opt.param_groups})
    intervals, inside = timer.summary(warmup)
    if len(intervals) != steps:
      raise SystemExit(f"timed {len(intervals)} steps, expected {steps}")
    med = statistics.median(intervals)
    res = dict(
        peer="trl", workload=workload, spec=w, steps=steps, warmup=warmup,
        s_per_step=med, s_per_step_inside=statistics.median(inside),
        step_times=intervals, tokens_per_step=tokens_per_step,
        tokens_per_s=tokens_per_step / med, total_train_wall_s=wall,
        achieved_gflops=(flops_per_step / med / 1e9) if flops_per_step else None,
        n_params=n_params, attn_implementation=attn, optimizer=opt_name, optimizer_defaults=opt_defaults,
        torch_threads=torch.get_num_threads(),
        versions=dict(trl=trl.__version__, torch=torch.__version__,
                      transformers=transformers.__version__, datasets=datasets.__version__,
                      python=platform.python_version()),
        env={k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
             if k in os.environ},
        machine=dict(cpu_count=os.cpu_count(), loadavg=os.getloadavg(),
                     platform=platform.platform()))
    if workload == "grpo":
      if len(gen_times) != total:
        raise SystemExit(f"{len(gen_times)} generations in {total} steps, want one per step")
      g = gen_times[warmup:warmup + steps]
      if len(set(gen_lens)) != 1 or gen_lens[0] != spec.WORKLOADS["grpo"]["max_new_tokens"]:
        raise SystemExit(f"generated lengths {sorted(set(gen_lens))}, want exactly {N}")
      res.update(gen_s_per_step=statistics.median(g),
                 decode_tokens_per_s=Np * G * N / statistics.median(g),
                 gen_share=statistics.median([a / b for a, b in zip(g, intervals)]),
                 gen_lengths=sorted(set(gen_lens)))
    res.update(extra)
    return res


def main():
  spec.peer_main(run, __doc__.splitlines()[0])


if __name__ == "__main__":
  main()
