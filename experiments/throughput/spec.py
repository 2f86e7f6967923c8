"""The benchmark workloads (issue #7), shared by our suite (bench.py) and the peer
harness (peers.py) so that every library does exactly the same work.

Model: Llama-style decoder, vocab 1024, d_model 256, 4 layers, 4 query heads / 2 KV
heads, head_dim 64, SwiGLU MLP 1024, untied embeddings, RMSNorm eps 1e-5, RoPE theta
10000 (4,458,752 parameters). Optimiser: AdamW lr 1e-5 (constant, no warmup),
betas (0.9, 0.999), eps 1e-8, weight decay 0, global-norm clip 1.0. fp32 everywhere. Data: random token ids (uniform over the vocabulary
minus the special ids), so no tokenizer or text processing is timed.
"""

MODEL = dict(vocab_size=1024, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
             head_dim=64, d_ff=1024, tie_embeddings=False, rope_theta=10000.0,
             norm_eps=1e-5)

OPTIMIZER = dict(lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0)

WORKLOADS = {
    # batch rows x sequence tokens; every token is a target (packed pre-training-like rows)
    "sft": dict(batch_size=16, seq_len=128),
    # pairs per step; prompt / completion tokens; the reference model's forward pass on
    # every step (no cached reference log-probs): sigmoid DPO, beta 0.1
    "dpo": dict(pairs=8, prompt_len=64, completion_len=64, beta=0.1),
    # prompts x group; prompt tokens; exactly max_new_tokens sampled (T=1, no EOS stop:
    # the sampled length is fixed so that every library generates the same tokens);
    # KL beta; one policy update per rollout (num_iterations=1)
    "grpo": dict(prompts=8, group_size=4, prompt_len=32, max_new_tokens=64, beta=0.04,
                 num_iterations=1),
}

TIMED_STEPS = 10   # medians over these, after WARMUP steps (compilation, caches)
WARMUP_STEPS = 3


def num_params(m=MODEL) -> int:
  d, f, v, L = m["d_model"], m["d_ff"], m["vocab_size"], m["n_layers"]
  q, kv = m["n_heads"] * m["head_dim"], m["n_kv_heads"] * m["head_dim"]
  per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
  return v * d * (1 if m["tie_embeddings"] else 2) + L * per_layer + d


def _flops_lib():
  """rlhf_jax/flops.py, the one FLOPs formula, loaded by path: it needs only the standard
  library, so the peer venvs (no rlhf_jax, no jax) use it too."""
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(__file__), "..", "..", "rlhf_jax", "flops.py")
  spec = importlib.util.spec_from_file_location("_rlhf_jax_flops", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def train_flops(tokens: int, seq_len: int, m=MODEL) -> float:
  """Model FLOPs of a forward+backward pass over `tokens` tokens in rows of `seq_len`
  (`rlhf_jax.flops.train_flops`: 3 x forward; matmuls incl. the unembedding of every
  position, causal attention over T(T+1)/2 pairs a row; the embedding gather excluded)."""
  import types
  c = types.SimpleNamespace(**m, resolved_remat_policy="none")
  return float(_flops_lib().train_flops(c, tokens // seq_len, seq_len)[0])


def forward_flops(tokens: int, seq_len: int, m=MODEL) -> float:
  return train_flops(tokens, seq_len, m) / 3


def peer_main(run, description: str) -> None:
  """The peer scripts' command line (peer_trl.py, peer_tunix.py; each in its own venv):
  --workload/--steps/--warmup/--out; run(workload, steps, warmup) -> dict, printed as one
  `PEER_RESULT {json}` line (what peers.py reads) and written to --out."""
  import argparse
  import json
  ap = argparse.ArgumentParser(description=description)
  ap.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
  ap.add_argument("--steps", type=int, default=TIMED_STEPS)
  ap.add_argument("--warmup", type=int, default=WARMUP_STEPS, help=">= 1")
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  line = json.dumps(run(a.workload, a.steps, a.warmup))
  if a.out:
    with open(a.out, "w") as f:
      f.write(line + "\n")
  print("PEER_RESULT " + line, flush=True)
