"""GRPO and DPO start from a Gemma-family checkpoint (issue #20, "GRPO/DPO accept it too"),
fast: a tiny random Gemma 3 / Gemma 2 model written as a llama.cpp-style GGUF with a tiny
SentencePiece vocabulary (Gemma's special tokens and <start_of_turn> / <end_of_turn>), so
that `init_from` takes the same path as the real Gemma-3-270M (tests/test_gemma3.py,
README "Using Gemma"): GGUF gemma2 / gemma3 weights (norms stored as 1 + w, sandwich
norms, QK-norm, soft-caps, local / global layers), the SentencePiece GGUF tokenizer with
the `gemma` chat style and eos = <end_of_turn>, then one step of each trainer.

The windows (3 tokens) are shorter than every prompt, so a sampler or a log-prob pass
that ignored them would disagree with the other.
"""
import dataclasses
import json
import math
import os
import re

import gguf
import jax
import numpy as np
import pytest

from conftest import REPO, override, read_metrics
from rlhf_jax import launch
from rlhf_jax import trainers
from rlhf_jax.launch import load_config
from rlhf_jax.models import ModelConfig, lm_logits, load_pretrained
from rlhf_jax.tokenizer import load_tokenizer
from rlhf_jax.trainers import dpo, grpo
from test_model import random_params

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
BYTES = [f"<0x{i:02X}>" for i in range(256)]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789:+?.,-=") + ["▁"]
MERGED = ["us", "er", "user", "mo", "de", "mode", "model"]   # BPE: us+er, mo+de, mode+l
TOKENS = SPECIAL + ["\n"] + BYTES + CHARS + MERGED
TYPES = [3] * len(SPECIAL) + [4] + [6] * len(BYTES) + [1] * (len(CHARS) + len(MERGED))
SCORES = [-1000.0] * (len(SPECIAL) + 1) + [0.0] * len(BYTES) + [
    -float(i) for i in range(len(CHARS) + len(MERGED))]
WINDOW = 3

FAMILIES = {  # what the GGUF loader must build from each file
    "gemma3": ModelConfig(
        vocab_size=len(TOKENS), d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
        d_ff=64, rope_theta=1e6, norm_eps=1e-6, norm_offset=1.0, embed_scale=True,
        tie_embeddings=True, qk_norm=True, activation="gelu_tanh", max_seq_len=128,
        sliding_window=WINDOW, window_pattern="LG", rope_local_theta=1e4, post_norms=True),
    "gemma2": ModelConfig(
        vocab_size=len(TOKENS), d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
        d_ff=64, rope_theta=1e4, norm_eps=1e-6, norm_offset=1.0, embed_scale=True,
        tie_embeddings=True, activation="gelu_tanh", max_seq_len=128, sliding_window=WINDOW,
        window_pattern="LG", attn_softcap=50.0, final_softcap=30.0, post_norms=True),
}


def write_gemma_gguf(path, arch, config, params, pattern_per_layer=False):
  """`params` (our tree) as llama.cpp's convert_hf_to_gguf.py writes a gemma2 / gemma3
  model: [out, in] matrices, every RMSNorm weight stored as 1 + w, the tokenizer as
  SentencePiece tokens / scores / types (llama.cpp "llama" tokenizer model)."""
  c = config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.n_layers)
  w.add_context_length(c.max_seq_len)
  w.add_embedding_length(c.d_model)
  w.add_feed_forward_length(c.d_ff)
  w.add_head_count(c.n_heads)
  w.add_head_count_kv(c.n_kv_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_rope_freq_base(c.rope_theta)
  w.add_layer_norm_rms_eps(c.norm_eps)
  w.add_sliding_window(c.sliding_window)
  if pattern_per_layer:  # newer llama.cpp conversions: one bool per layer (True = local)
    w.add_sliding_window_pattern(list(c.local_layers))
  else:
    w.add_sliding_window_pattern(len(c.window_pattern))  # "L" * (n - 1) + "G"
  if c.attn_softcap:
    w.add_attn_logit_softcapping(c.attn_softcap)
    w.add_final_logit_softcapping(c.final_softcap)
  w.add_tokenizer_model("llama")
  w.add_tokenizer_pre("default")
  w.add_token_list(TOKENS)
  w.add_token_scores(SCORES)
  w.add_token_types(TYPES)
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  w.add_unk_token_id(3)
  w.add_pad_token_id(0)
  w.add_add_bos_token(True)
  w.add_add_space_prefix(False)
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  norm = lambda x: f32(np.float32(1.0) + f32(x))
  L, D = params["layers"], c.d_model
  tensors = {"token_embd.weight": f32(params["embed"]["embedding"]),
             "output_norm.weight": norm(params["final_norm"]["scale"])}
  for i in range(c.n_layers):
    b = f"blk.{i}."
    for name, key in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v")):
      tensors[b + name + ".weight"] = f32(L[key]["kernel"][i].reshape(D, -1).T)
    tensors[b + "attn_output.weight"] = f32(L["o"]["kernel"][i].reshape(-1, D).T)
    for name, key in (("gate", "gate"), ("up", "up"), ("down", "down")):
      tensors[b + f"ffn_{name}.weight"] = f32(L[key]["kernel"][i].T)
    for name, key in (("attn_norm", "attn_norm"), ("post_attention_norm", "post_attn_norm"),
                      ("ffn_norm", "mlp_norm"), ("post_ffw_norm", "post_mlp_norm"),
                      ("attn_q_norm", "q_norm"), ("attn_k_norm", "k_norm")):
      if key in L:
        tensors[b + name + ".weight"] = norm(L[key]["scale"][i])
  for name, t in tensors.items():
    w.add_tensor(name, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def stored_params(config, seed):
  """Random parameters as a GGUF can hold them: norm weights w with (1 + w) - 1 == w in
  float32, so what the loader returns is exactly what was written. Embeddings at 0.3 x
  `random_params`' (N(0, 1) rows scaled by sqrt(d_model) dominate the residual stream and
  the tied unembedding then repeats the last token with probability ~1): next-token
  entropy ~3 nats, so sampled tokens' log-probs can show a window that is ignored."""
  one = np.float32(1.0)

  def leaf(path, x):
    x = np.asarray(x, np.float32)
    name = str(getattr(path[-1], "key", ""))
    if name == "scale":
      x = (one + x) - one
    if name == "embedding":
      x = x * np.float32(0.3)
    return x
  return jax.tree_util.tree_map_with_path(leaf, random_params(config, seed))


_FILES = {}


def gemma_gguf(arch, tmp_path_factory):
  """(path, config, params) of the tiny `arch` GGUF, written once per test session."""
  if arch not in _FILES:
    config = FAMILIES[arch]
    params = stored_params(config, 0)
    path = write_gemma_gguf(tmp_path_factory.mktemp(arch) / f"tiny_{arch}.gguf", arch, config,
                            params)
    _FILES[arch] = path, config, params
  return _FILES[arch]


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_tiny_gemma_gguf_loads_with_its_tokenizer(arch, tmp_path_factory):
  """The file the trainer tests start from is what it should be: the loader's config and
  parameters are exactly what was written (norms 1 + w back to w, [out, in] matrices back
  to our layout), the tokenizer is the `gemma` chat style with <end_of_turn> as eos and
  splits the chat prompt as SentencePiece BPE does, the logits are finite (and within
  Gemma 2's final soft-cap)."""
  path, config, params = gemma_gguf(arch, tmp_path_factory)
  got_config, got_params = load_pretrained(path)
  assert got_config == config
  for (kp, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                        jax.tree_util.tree_leaves(got_params)):
    np.testing.assert_array_equal(a, np.asarray(b), err_msg=jax.tree_util.keystr(kp))
  tok = load_tokenizer(path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.chat_style, tok.add_bos) == (
      2, TOKENS.index("<end_of_turn>"), 0, "gemma", True)
  prompt = tok.apply_chat_template([{"role": "user", "content": "add: 3+4"}])
  ids = tok.encode(prompt, add_bos=True)
  assert [tok.id_to_token(i) for i in ids] == [
      "<bos>", "<start_of_turn>", "user", "\n", "a", "d", "d", ":", "▁", "3", "+", "4",
      "<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]
  assert tok.decode(ids[1:]) == prompt
  logits = np.asarray(lm_logits(got_config, got_params, np.array([ids])))
  assert np.isfinite(logits).all() and logits.shape == (1, len(ids), len(TOKENS))
  if config.final_softcap:
    assert np.abs(logits).max() < config.final_softcap


@pytest.mark.parametrize("pattern", ["LLG", "GLL"])
def test_a_per_layer_window_pattern_loads(pattern, tmp_path):
  """llama.cpp's other form of `sliding_window_pattern`: one bool per layer. A period could
  not say "GLL" (global first), the per-layer list can; a list of the wrong length is one
  error naming the key."""
  config = dataclasses.replace(FAMILIES["gemma3"], n_layers=3, window_pattern=pattern)
  params = stored_params(config, 1)
  path = write_gemma_gguf(tmp_path / "p.gguf", "gemma3", config, params, pattern_per_layer=True)
  got, _ = load_pretrained(path)
  assert got.local_layers == tuple(x == "L" for x in pattern) and got == config


def test_grpo_one_step_from_a_gemma3_gguf(tmp_path_factory, tfds_data_dir, tmp_path):
  """One GRPO step from the Gemma 3 GGUF (the real model's family: QK-norm, local RoPE base,
  local / global layers), full fine-tuning, k3 KL to the reference (the initial policy).
  The sampler's log-probs (KV cache) equal the trainer's recomputed ones (a group's rows
  packed, windows counted in positions): `is/logp_abs_diff` ~ 1e-7, where a model without
  the windows differs from this one by ~0.5 nats per sampled token (entropy ~3 nats); the
  KL at step 1 is 0 (policy = reference)."""
  path, config, _ = gemma_gguf("gemma3", tmp_path_factory)
  c = load_config("configs/grpo.py:tiny")
  wd = str(tmp_path / "grpo")
  override(c, init_from=path, num_steps=1, log_every=1, eval_every=0, **{
      "data.data_dir": tfds_data_dir, "data.synthetic_train_examples": 64,
      "data.synthetic_eval_examples": 8, "data.max_prompt_len": 20,
      "rollout.prompts_per_step": 2, "rollout.group_size": 4, "rollout.max_new_tokens": 4,
      "rollout.stop_at_eos": False, "rollout.is_correction": "tis",
      "checkpoint.async_save": False, "sample.every": 0})
  grpo.run(c, wd)
  (row,) = read_metrics(wd)
  assert row["step"] == 1 and np.isfinite(row["loss"]) and row["response_length"] == 4
  assert row["is/logp_abs_diff"] < 1e-5, row["is/logp_abs_diff"]
  assert abs(row["kl"]) < 1e-6 and row["entropy"] > 1.0, (row["kl"], row["entropy"])
  built = json.load(open(os.path.join(wd, "model_config.json")))
  assert (built["window_pattern"], built["sliding_window"], built["qk_norm"]) == (
      "LG", WINDOW, True)
  tok = json.load(open(os.path.join(wd, "tokenizer_config.json")))
  assert (tok["chat_style"], tok["eos_token"]) == ("gemma", "<end_of_turn>")


def test_dpo_lora_one_step_from_a_gemma2_gguf(tmp_path_factory, tfds_data_dir, tmp_path):
  """One DPO step with LoRA from the Gemma 2 GGUF (attention and final logit soft-caps in
  every log-prob pass), the reference log-probs computed per step from the frozen base:
  at step 1 the adapted policy is the base, so the sigmoid loss is exactly
  -log sigmoid(0) = log 2, and only the adapters have gradients."""
  path, config, _ = gemma_gguf("gemma2", tmp_path_factory)
  c = load_config("configs/dpo.py:tiny")
  wd = str(tmp_path / "dpo")
  override(c, init_from=path, num_steps=1, log_every=1, eval_every=0, batch_size=4, **{
      "data.data_dir": tfds_data_dir, "data.synthetic_train_examples": 16,
      "data.synthetic_eval_examples": 4, "optimizer.warmup_steps": 0,
      "dpo.precompute_reference": False, "lora.rank": 4,
      "checkpoint.async_save": False, "sample.every": 0})
  dpo.run(c, wd)
  (row,) = read_metrics(wd)
  assert row["step"] == 1
  assert row["loss"] == pytest.approx(math.log(2), abs=1e-6), row["loss"]
  assert np.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
  built = json.load(open(os.path.join(wd, "model_config.json")))
  assert (built["attn_softcap"], built["final_softcap"]) == (50.0, 30.0)


def readme_gemma_commands() -> list[list[str]]:
  """The `rlhf-jax train` commands of README "Using Gemma" (its ```bash block), as argv."""
  text = (REPO / "README.md").read_text()
  assert "* Using Gemma" in text, "README.md has no 'Using Gemma' paragraph"
  part = text.split("* Using Gemma", 1)[1]
  block = re.search(r"```bash\n(.*?)```", part, re.S).group(1)
  joined = re.sub(r"\\\n\s*", "", block)
  return [line.split()[2:] for line in joined.splitlines()
          if line.strip().startswith("rlhf-jax train")]


def test_readme_gemma_commands_parse_and_validate(tmp_path_factory, monkeypatch):
  """README "Using Gemma"'s three commands, their overrides parsed as `rlhf-jax train`
  parses them (with the tiny Gemma 3 GGUF for $GEMMA) and validated by their trainer, so
  that the paragraph cannot drift from the configs (the runs themselves are minutes and
  GBs of the real model: the README gives the measurement)."""
  path, _, _ = gemma_gguf("gemma3", tmp_path_factory)
  commands = readme_gemma_commands()
  seen = {}
  monkeypatch.setattr(launch, "_train", lambda cfg, workdir: seen.setdefault(cfg.trainer, cfg))
  for argv in commands:
    launch.train_command([a.replace("$GEMMA", path) for a in argv])
  assert sorted(seen) == ["dpo", "grpo", "sft"], commands
  for cfg in seen.values():
    assert cfg.init_from == path and cfg.num_steps == 3 and cfg.eval_every == 0
    trainers.validate(cfg, 1)
  assert seen["sft"].optimizer.lr == 1e-5 and seen["dpo"].optimizer.lr == 1e-6
  assert seen["dpo"].dpo.precompute_reference is False
  assert (seen["grpo"].rollout.prompts_per_step, seen["grpo"].rollout.group_size) == (4, 4)
