"""Pretrained import/export: HF safetensors, sharded index, GGUF, our orbax format."""

import json

import gguf
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rlhf_jax.models import (ModelConfig, import_checkpoint, init_params, lm_logits,
                             load_pretrained, save_pretrained)
from rlhf_jax.tokenizer import load_tokenizer

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48)
CONFIGS = {
    "llama_tied": ModelConfig(**BASE),
    "qwen2_bias_untied": ModelConfig(**BASE, attn_bias=True, tie_embeddings=False),
    "qwen3_qk_norm": ModelConfig(**{**BASE, "head_dim": 16}, qk_norm=True, rope_theta=1e6),
    "llama3_rope_scaling": ModelConfig(**BASE, rope_theta=5e5, rope_scaling=(8.0, 1.0, 4.0, 16),
                                       max_seq_len=128),
    "llama_all_biases": ModelConfig(**BASE, attn_bias=True, mlp_bias=True),
    "gemma": ModelConfig(**BASE, norm_offset=1.0, embed_scale=True, activation="gelu_tanh"),
    # Issue #20: the sliding-window families (windows shorter than TOKENS).
    "gemma2": ModelConfig(**{**BASE, "n_layers": 3}, norm_offset=1.0, embed_scale=True,
                          activation="gelu_tanh", post_norms=True, sliding_window=4,
                          window_pattern="LG", attn_softcap=3.0, final_softcap=5.0,
                          query_pre_attn_scalar=12.0),
    "gemma3_text": ModelConfig(**{**BASE, "n_layers": 3}, norm_offset=1.0, embed_scale=True,
                               activation="gelu_tanh", post_norms=True, qk_norm=True,
                               sliding_window=4, window_pattern="LLG", rope_theta=1e6,
                               rope_local_theta=1e4, rope_linear_factor=8.0),
    "mistral_window": ModelConfig(**BASE, sliding_window=3, tie_embeddings=False),
    "qwen2_window": ModelConfig(**{**BASE, "n_layers": 3}, attn_bias=True, sliding_window=5,
                                window_pattern="GLL"),
}
MODEL_TYPES = {"llama_tied": "llama", "qwen2_bias_untied": "qwen2", "qwen3_qk_norm": "qwen3",
               "llama3_rope_scaling": "llama", "llama_all_biases": "llama", "gemma": "gemma",
               "gemma2": "gemma2", "gemma3_text": "gemma3_text", "mistral_window": "mistral",
               "qwen2_window": "qwen2"}
TOKENS = np.array([[1, 5, 9, 33, 2, 63, 17, 8, 0, 41]], np.int32)


def random_params(config, seed=0):
  """Random float32 params in the tree of init_params (numpy: no compilation)."""
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return (base + rng.normal(0, 0.3, x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    assert np.asarray(y).dtype == np.float32, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_roundtrip_bit_exact(tmp_path, name):
  config = CONFIGS[name]
  params = random_params(config)
  save_pretrained(config, params, tmp_path / "hf")
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert hf_config["model_type"] == MODEL_TYPES[name]
  config2, params2 = load_pretrained(tmp_path / "hf")
  assert config2 == config
  assert_trees_equal(params, params2)
  np.testing.assert_array_equal(lm_logits(config, params, TOKENS),
                                lm_logits(config2, params2, TOKENS))


def test_save_refuses_non_empty_dir_and_overwrites_when_asked(tmp_path):
  config = CONFIGS["llama_tied"]
  save_pretrained(config, random_params(config, 0), tmp_path)
  with pytest.raises(FileExistsError, match="not empty"):
    save_pretrained(config, random_params(config, 1), tmp_path)
  params1 = random_params(config, 1)
  save_pretrained(config, params1, tmp_path, overwrite=True)
  assert_trees_equal(params1, load_pretrained(tmp_path)[1])


def test_save_rejects_params_not_matching_config(tmp_path):
  config = CONFIGS["llama_tied"]
  params = random_params(CONFIGS["qwen2_bias_untied"])
  with pytest.raises(ValueError, match="lm_head"):
    save_pretrained(config, params, tmp_path / "x")


def test_runtime_overrides(tmp_path):
  config = CONFIGS["llama_tied"]
  save_pretrained(config, random_params(config), tmp_path)
  config2, _ = load_pretrained(tmp_path, dtype="bfloat16", remat=True)
  assert (config2.dtype, config2.remat) == ("bfloat16", True)
  with pytest.raises(ValueError, match="n_layers"):
    load_pretrained(tmp_path, n_layers=3)


def test_sharded_index_loads(tmp_path):
  config = CONFIGS["qwen2_bias_untied"]
  params = random_params(config)
  save_pretrained(config, params, tmp_path)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  (tmp_path / "model.safetensors").unlink()
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  weight_map = {}
  for fname, shard_names in shards.items():
    save_file({n: tensors[n] for n in shard_names}, str(tmp_path / fname))
    weight_map.update({n: fname for n in shard_names})
  (tmp_path / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
  config2, params2 = load_pretrained(tmp_path)
  assert config2 == config
  assert_trees_equal(params, params2)


# ----------------------------------------------------------------------------
# Hand-written HF checkpoints against an independent float64 numpy forward
# ----------------------------------------------------------------------------

def hf_checkpoint(model_type, seed=0, V=64, D=32, L=2, H=4, K=2, Dh=8, F=48, tied=False):
  """(config.json dict, {HF name: float32 array}) in HF naming and [out, in] orientation."""
  rng = np.random.default_rng(seed)
  w = lambda *shape, s=0.2: rng.normal(0, s, shape).astype(np.float32)
  norm = lambda n: (1.0 + w(n, s=0.1)).astype(np.float32)
  cfg = {"model_type": model_type, "vocab_size": V, "hidden_size": D, "num_hidden_layers": L,
         "num_attention_heads": H, "num_key_value_heads": K, "head_dim": Dh,
         "intermediate_size": F, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
         "hidden_act": "silu", "tie_word_embeddings": tied, "max_position_embeddings": 64}
  W = {"model.embed_tokens.weight": w(V, D, s=1.0), "model.norm.weight": norm(D)}
  if not tied:
    W["lm_head.weight"] = w(V, D)
  for i in range(L):
    p = f"model.layers.{i}."
    W.update({p + "input_layernorm.weight": norm(D), p + "post_attention_layernorm.weight": norm(D),
              p + "self_attn.q_proj.weight": w(H * Dh, D),
              p + "self_attn.k_proj.weight": w(K * Dh, D),
              p + "self_attn.v_proj.weight": w(K * Dh, D),
              p + "self_attn.o_proj.weight": w(D, H * Dh),
              p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D),
              p + "mlp.down_proj.weight": w(D, F)})
    if model_type == "qwen2":
      for n, rows in (("q", H * Dh), ("k", K * Dh), ("v", K * Dh)):
        W[p + f"self_attn.{n}_proj.bias"] = w(rows)
    if model_type == "qwen3":
      W[p + "self_attn.q_norm.weight"] = norm(Dh)
      W[p + "self_attn.k_norm.weight"] = norm(Dh)
  return cfg, W


def reference_logits(cfg, W, tokens, inv_freq=None):
  """Float64 numpy forward of a HF Llama/Qwen2/Qwen3 checkpoint on one sequence."""
  W = {k: v.astype(np.float64) for k, v in W.items()}
  H, K, Dh = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
  eps, T = cfg["rms_norm_eps"], len(tokens)
  rms = lambda x, g: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g
  if inv_freq is None:
    inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, Dh, 2) / Dh)
  ang = np.arange(T)[:, None] * inv_freq[None]
  ang = np.concatenate([ang, ang], -1)[:, None]  # [T, 1, Dh]
  cos, sin = np.cos(ang), np.sin(ang)
  rope = lambda x: x * cos + np.concatenate([-x[..., Dh // 2:], x[..., :Dh // 2]], -1) * sin
  x = W["model.embed_tokens.weight"][tokens]
  causal = np.tril(np.ones((T, T), bool))
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}.self_attn."
    g = lambda n: W[f"model.layers.{i}.{n}"]
    h = rms(x, g("input_layernorm.weight"))
    proj = lambda n, heads: (h @ W[p + f"{n}_proj.weight"].T
                             + W.get(p + f"{n}_proj.bias", 0.0)).reshape(T, heads, Dh)
    q, k, v = proj("q", H), proj("k", K), proj("v", K)
    if p + "q_norm.weight" in W:
      q, k = rms(q, W[p + "q_norm.weight"]), rms(k, W[p + "k_norm.weight"])
    q, k = rope(q), rope(k)
    k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(Dh)
    s = np.where(causal, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    x = x + np.einsum("hts,shd->thd", a, v).reshape(T, H * Dh) @ W[p + "o_proj.weight"].T
    h = rms(x, g("post_attention_layernorm.weight"))
    gate = h @ g("mlp.gate_proj.weight").T
    mlp = gate / (1 + np.exp(-gate)) * (h @ g("mlp.up_proj.weight").T)
    x = x + mlp @ g("mlp.down_proj.weight").T
  x = rms(x, W["model.norm.weight"])
  return x @ W.get("lm_head.weight", W["model.embed_tokens.weight"]).T


def write_hf(path, cfg, W):
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(cfg))
  save_file(W, str(path / "model.safetensors"))
  return path


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("qwen2", False), ("qwen3", True),
                                             ("mistral", True)])
def test_hand_written_hf_matches_numpy_reference(tmp_path, model_type, tied):
  cfg, W = hf_checkpoint(model_type, tied=tied)
  config, params = load_pretrained(write_hf(tmp_path, cfg, W))
  assert config.attn_bias == (model_type == "qwen2")
  assert config.qk_norm == (model_type == "qwen3")
  assert config.tie_embeddings == tied
  got = np.asarray(lm_logits(config, params, TOKENS))[0]
  want = reference_logits(cfg, W, TOKENS[0])
  assert np.abs(want).max() > 1.0  # logits are not trivially small
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
  import ml_dtypes
  cfg, W = hf_checkpoint("llama")
  W16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in W.items()}
  config, params = load_pretrained(write_hf(tmp_path, cfg, W16))
  emb = params["embed"]["embedding"]
  assert emb.dtype == np.float32
  np.testing.assert_array_equal(emb, W16["model.embed_tokens.weight"].astype(np.float32))


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------

def test_error_nonexistent_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    load_pretrained(tmp_path / "nope")


def test_error_dir_without_config(tmp_path):
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_pretrained(tmp_path)


def test_error_unsupported_model_type(tmp_path):
  cfg, W = hf_checkpoint("llama")
  with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
    load_pretrained(write_hf(tmp_path, {**cfg, "model_type": "gpt2"}, W))


def test_error_missing_tensor(tmp_path):
  cfg, W = hf_checkpoint("qwen2")
  del W["model.layers.1.self_attn.k_proj.bias"]
  with pytest.raises(ValueError,
                     match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
    load_pretrained(write_hf(tmp_path, cfg, W))


def test_error_wrong_shape(tmp_path):
  cfg, W = hf_checkpoint("llama")
  W["model.layers.0.mlp.up_proj.weight"] = W["model.layers.0.mlp.up_proj.weight"].T.copy()
  with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape "
                                       r"\[32, 48\], expected \[48, 32\]"):
    load_pretrained(write_hf(tmp_path, cfg, W))


def test_error_unexpected_tensor_and_nonzero_o_bias(tmp_path):
  cfg, W = hf_checkpoint("llama")
  write_hf(tmp_path / "a", cfg, {**W, "model.layers.0.mlp.extra.weight": np.ones(3, np.float32)})
  with pytest.raises(ValueError, match="unexpected tensors.*mlp.extra.weight"):
    load_pretrained(tmp_path / "a")
  W["model.layers.0.self_attn.o_proj.bias"] = np.ones(32, np.float32)
  with pytest.raises(ValueError, match="o_proj.bias' is nonzero"):
    load_pretrained(write_hf(tmp_path / "b", {**cfg, "attention_bias": False}, W))


def test_error_not_a_gguf_file(tmp_path):
  (tmp_path / "w.bin").write_bytes(b"PK\x03\x04junk")
  with pytest.raises(ValueError, match="w.bin: not a GGUF file"):
    load_pretrained(tmp_path / "w.bin")


# ----------------------------------------------------------------------------
# GGUF written the llama.cpp way
# ----------------------------------------------------------------------------

GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight",
              "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight",
              "self_attn.o_proj.weight": "attn_output.weight",
              "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
              "self_attn.v_proj.bias": "attn_v.bias",
              "self_attn.q_norm.weight": "attn_q_norm.weight",
              "self_attn.k_norm.weight": "attn_k_norm.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight"}
TINY_TOKENS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list("abcdefghijklmnopqrstuvwxyz")
               + ["Ġ", "he", "ll", "hell", "hello", "Ġw", "or", "ld", "Ġwor", "Ġworld"])
TINY_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "l d", "Ġw or", "Ġwor ld"]


def llama_cpp_permute(w, n_head):
  """convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> interleaved."""
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, arch, cfg, W, rope_freqs=None, f16=(), tokenizer=False):
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(cfg["num_hidden_layers"])
  writer.add_context_length(cfg["max_position_embeddings"])
  writer.add_embedding_length(cfg["hidden_size"])
  writer.add_feed_forward_length(cfg["intermediate_size"])
  writer.add_head_count(cfg["num_attention_heads"])
  writer.add_head_count_kv(cfg["num_key_value_heads"])
  writer.add_key_length(cfg["head_dim"])
  writer.add_rope_dimension_count(cfg["head_dim"])
  writer.add_rope_freq_base(cfg["rope_theta"])
  writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  if tokenizer:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    vocab = TINY_TOKENS + [f"<unused{i}>" for i in range(cfg["vocab_size"] - len(TINY_TOKENS))]
    writer.add_token_list(vocab)
    writer.add_token_types([3, 3, 3] + [1] * (len(vocab) - 3))
    writer.add_token_merges(TINY_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template("{% for m in messages %}<|im_start|>...{% endfor %}")
  H, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  tensors = {"token_embd.weight": W["model.embed_tokens.weight"],
             "output_norm.weight": W["model.norm.weight"]}
  if "lm_head.weight" in W:
    tensors["output.weight"] = W["lm_head.weight"]
  for name, w in W.items():
    if name.startswith("model.layers."):
      _, _, i, rest = name.split(".", 3)
      if arch == "llama" and rest == "self_attn.q_proj.weight":
        w = llama_cpp_permute(w, H)
      if arch == "llama" and rest == "self_attn.k_proj.weight":
        w = llama_cpp_permute(w, K)
      tensors[f"blk.{i}.{GGUF_NAMES[rest]}"] = w
  if rope_freqs is not None:
    tensors["rope_freqs.weight"] = rope_freqs
  for name, w in tensors.items():
    writer.add_tensor(name, w.astype(np.float16) if name in f16 else w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", False),
                                       ("qwen3", True)])
def test_gguf_matches_hf_layout(tmp_path, arch, tied):
  cfg, W = hf_checkpoint(arch, tied=tied)
  path = write_gguf(tmp_path / "m.gguf", arch, cfg, W)
  config, params = load_pretrained(path)
  hf_config, hf_params = load_pretrained(write_hf(tmp_path / "hf", cfg, W))
  assert config == hf_config
  assert_trees_equal(hf_params, params)  # permutation undone exactly
  got = np.asarray(lm_logits(config, params, TOKENS))[0]
  np.testing.assert_allclose(got, reference_logits(cfg, W, TOKENS[0]), rtol=1e-4, atol=1e-4)


def test_gguf_permutation_is_not_a_no_op(tmp_path):
  """Loading permuted Q/K rows as if they were HF rows must change the logits."""
  cfg, W = hf_checkpoint("llama")
  Wp = dict(W)
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}.self_attn."
    Wp[p + "q_proj.weight"] = llama_cpp_permute(W[p + "q_proj.weight"], 4)
    Wp[p + "k_proj.weight"] = llama_cpp_permute(W[p + "k_proj.weight"], 2)
  config, params = load_pretrained(write_hf(tmp_path, cfg, Wp))
  got = np.asarray(lm_logits(config, params, TOKENS))[0]
  assert np.abs(got - reference_logits(cfg, W, TOKENS[0])).max() > 1e-2


def test_gguf_f16_tensors_and_llama3_rope_freqs(tmp_path):
  cfg, W = hf_checkpoint("llama")
  cfg = {**cfg, "rope_theta": 500000.0, "head_dim": 8}
  Dh, factor, low, high, orig = 8, 32.0, 1.0, 4.0, 8192
  inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, Dh, 2) / Dh)
  wl = 2 * np.pi / inv
  smooth = (orig / wl - low) / (high - low)
  freqs = np.where(wl < orig / high, 1.0,
                   np.where(wl > orig / low, factor, 1 / ((1 - smooth) / factor + smooth)))
  assert 1.0 in freqs and factor in freqs and ((freqs > 1) & (freqs < factor)).any()  # 3 bands
  path = write_gguf(tmp_path / "m.gguf", "llama", cfg, W, rope_freqs=freqs.astype(np.float32),
                    f16=("blk.0.ffn_up.weight",))
  config, params = load_pretrained(path)
  assert config.rope_scaling == (32.0, 1.0, 4.0, 8192)
  np.testing.assert_array_equal(params["layers"]["up"]["kernel"][0],
                                W["model.layers.0.mlp.up_proj.weight"].astype(np.float16)
                                .astype(np.float32).T)
  W16 = {**W, "model.layers.0.mlp.up_proj.weight":
         W["model.layers.0.mlp.up_proj.weight"].astype(np.float16).astype(np.float32)}
  got = np.asarray(lm_logits(config, params, TOKENS))[0]
  want = reference_logits(cfg, W16, TOKENS[0], inv_freq=inv / freqs)
  unscaled = reference_logits(cfg, W16, TOKENS[0])
  assert np.abs(want - unscaled).max() > 2e-3  # the test can see the scaling
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_gguf_unsupported_architecture(tmp_path):
  writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gpt2")
  writer.add_block_count(1)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match="m.gguf: GGUF architecture 'gpt2' is not supported"):
    load_pretrained(tmp_path / "m.gguf")


def test_gguf_missing_tensor(tmp_path):
  cfg, W = hf_checkpoint("llama")
  del W["model.layers.1.mlp.down_proj.weight"]
  with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.down_proj.weight'"):
    load_pretrained(write_gguf(tmp_path / "m.gguf", "llama", cfg, W))


# ----------------------------------------------------------------------------
# import_checkpoint (our orbax format) and tokenizer files
# ----------------------------------------------------------------------------

def test_import_checkpoint_from_gguf_with_tokenizer(tmp_path):
  cfg, W = hf_checkpoint("llama")
  path = write_gguf(tmp_path / "m.gguf", "llama", cfg, W, tokenizer=True)
  out = import_checkpoint(path, tmp_path / "ours")
  assert sorted(p.name for p in out.iterdir()) == ["model_config.json", "params",
                                                   "tokenizer.json", "tokenizer_config.json"]
  config, params = load_pretrained(path)
  config2, params2 = load_pretrained(out)
  assert config2 == config
  assert_trees_equal(params, params2)
  tok, tok2 = load_tokenizer(path), load_tokenizer(out)
  text = "<|im_start|>hello world<|im_end|>"
  ids = tok.encode(text)
  assert ids == [1, TINY_TOKENS.index("hello"), TINY_TOKENS.index("Ġworld"), 2]
  assert tok2.encode(text) == ids and tok2.decode(ids) == text
  assert (tok2.bos_id, tok2.eos_id, tok2.pad_id) == (1, 2, 0)  # pad == eos declared: pad 0
  assert tok2.chat_style == "chatml"
  with pytest.raises(FileExistsError, match="not empty"):
    import_checkpoint(path, out)


def test_import_checkpoint_from_hf_copies_tokenizer_files(tmp_path):
  config = CONFIGS["qwen3_qk_norm"]
  params = random_params(config)
  save_pretrained(config, params, tmp_path / "hf")
  (tmp_path / "hf" / "tokenizer_config.json").write_text('{"eos_token": "x"}')
  out = import_checkpoint(tmp_path / "hf", tmp_path / "ours")
  assert (out / "tokenizer_config.json").read_text() == '{"eos_token": "x"}'
  config2, params2 = load_pretrained(out)
  assert config2 == config
  assert_trees_equal(params, params2)


def test_hf_window_configs_read_as_each_family_defines_them():
  """Issue #20: sliding windows are modelled (no warning): layer_types when given, else
  each family's default layers."""
  import warnings
  from rlhf_jax.models.hf_checkpoint import _config_from_hf
  base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  g2 = dict(base, model_type="gemma2", architectures=["Gemma2ForCausalLM"], sliding_window=4,
            query_pre_attn_scalar=8, attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh")
  g3 = dict(base, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
            sliding_window=512, sliding_window_pattern=3, rope_theta=1e6,
            rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0},
            query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    c2 = _config_from_hf(g2, "g2")
    c3 = _config_from_hf(g3, "g3")
    mistral = _config_from_hf(dict(base, model_type="mistral", sliding_window=7), "m")
    qwen = _config_from_hf(dict(base, model_type="qwen2", sliding_window=7,
                                use_sliding_window=True, max_window_layers=2), "q")
    off = _config_from_hf(dict(base, model_type="qwen2", sliding_window=7), "q")
    types = _config_from_hf(dict(g3, layer_types=["sliding_attention", "full_attention"] * 3),
                            "g3")
  assert (c2.sliding_window, c2.window_pattern, c2.local_layers[:2]) == (4, "LG", (True, False))
  assert (c2.attn_softcap, c2.final_softcap, c2.query_pre_attn_scalar) == (50.0, 30.0, 0.0)
  assert c2.post_norms and not c2.qk_norm and c2.norm_offset == 1.0
  assert (c3.window_pattern, c3.rope_local_theta, c3.rope_linear_factor) == ("LLG", 1e4, 8.0)
  assert c3.qk_norm and c3.post_norms and c3.query_pre_attn_scalar == 16.0
  assert (mistral.sliding_window, mistral.window_pattern) == (7, "")
  assert (qwen.sliding_window, qwen.window_pattern) == (7, "GGLLLL")
  assert (off.sliding_window, off.window_pattern) == (0, "")
  assert types.window_pattern == "LG"


def test_save_refuses_features_the_model_type_cannot_hold(tmp_path):
  for config, match in (
      (ModelConfig(**BASE, attn_softcap=5.0), "llama cannot hold attn_softcap"),
      (ModelConfig(**{**BASE, "n_layers": 3}, sliding_window=4, window_pattern="LG"),
       "mistral cannot hold window_pattern"),
      (ModelConfig(**{**BASE, "n_layers": 3}, attn_bias=True, sliding_window=4,
                   window_pattern="LG"), "qwen2 cannot hold window_pattern")):
    with pytest.raises(ValueError, match=match):
      save_pretrained(config, random_params(config), tmp_path / "x")
