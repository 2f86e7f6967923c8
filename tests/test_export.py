"""`rlhf-jax export` (rlhf_jax/export.py): a run's workdir as a Hugging Face directory.

Identical parameters and logits after load_pretrained, the HF Llama tensor names and
orientation (checked with the independent float64 numpy forward of HF tensors in
test_pretrained.py), LoRA adapters merged (against float64 W + (alpha/r) A B), the
tokenizer along, and one-line refusals.
"""
import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import override, read_metrics
from rlhf_jax import export
from rlhf_jax.checkpoint import read_checkpoint
from rlhf_jax.launch import load_config
from rlhf_jax.models import ModelConfig, lm_logits, load_pretrained, lora
from rlhf_jax.tokenizer import load_tokenizer
from rlhf_jax import workdir as workdir_lib
from test_pretrained import reference_logits


def sft_config(**over):
  c = load_config("configs/sft.py:tiny")
  c.data.update(synthetic_task="add", synthetic_max_len=2, synthetic_train_examples=200,
                synthetic_eval_examples=32)
  c.update(num_steps=3, eval_every=0, log_every=1)
  c.optimizer.update(lr=1e-2, warmup_steps=0)
  c.checkpoint.update(every=2, async_save=False)
  return override(c, **over)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  from rlhf_jax.trainers import sft
  wd = str(tmp_path_factory.mktemp("sft"))
  sft.run(sft_config(), wd)
  return wd


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  from rlhf_jax.trainers import sft
  wd = str(tmp_path_factory.mktemp("lora"))
  sft.run(sft_config(**{"lora.rank": 2, "lora.alpha": 3.0, "eval_every": 3, "eval_batches": 1,
                        "sample.every": 0, "lora.target_modules": tuple(lora.TARGETS)}), wd)
  return wd


def _model_config(wd):
  with open(os.path.join(wd, "model_config.json")) as f:
    return ModelConfig.from_dict(json.load(f))


TOKENS = np.array([[2, 5, 9, 11, 7, 3, 14, 6, 20, 8]], np.int32)


@pytest.mark.slow  # a training run
def test_export_has_identical_logits_and_the_hf_llama_layout(sft_run, tmp_path, capsys):
  out = str(tmp_path / "hf")
  assert export.main([sft_run, out]) == 0
  assert "model_type=llama" in capsys.readouterr().out
  c = _model_config(sft_run)
  hf = json.load(open(os.path.join(out, "config.json")))
  assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"]
  assert (hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
          hf["num_key_value_heads"], hf["head_dim"], hf["intermediate_size"],
          hf["vocab_size"], hf["tie_word_embeddings"]) == (
              c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff,
              c.vocab_size, c.tie_embeddings)
  tok = load_tokenizer(sft_run)
  assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (
      tok.bos_id, tok.eos_id, tok.pad_id)
  assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == tok.eos_id

  W = load_file(os.path.join(out, "model.safetensors"))
  D, H, K, Dh, F = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
  want = {"model.embed_tokens.weight": (c.vocab_size, D), "model.norm.weight": (D,)}
  for i in range(c.n_layers):
    p = f"model.layers.{i}."
    want.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                 p + "self_attn.q_proj.weight": (H * Dh, D),
                 p + "self_attn.k_proj.weight": (K * Dh, D),
                 p + "self_attn.v_proj.weight": (K * Dh, D),
                 p + "self_attn.o_proj.weight": (D, H * Dh),
                 p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                 p + "mlp.down_proj.weight": (D, F)})
  assert {k: v.shape for k, v in W.items()} == want  # tied: no lm_head.weight
  assert all(v.dtype == np.float32 for v in W.values())

  _, state = read_checkpoint(os.path.join(sft_run, "checkpoints"))
  config2, params2 = load_pretrained(out)
  assert config2 == c.__class__(**{**c.to_dict(), "dtype": "float32", "remat": False})
  for x, y in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(x, y)
  ours = np.asarray(lm_logits(c, state["params"], TOKENS))
  np.testing.assert_array_equal(np.asarray(lm_logits(config2, params2, TOKENS)), ours)
  # the HF names / [out, in] orientation drive an independent float64 numpy forward
  np.testing.assert_allclose(reference_logits(hf, W, TOKENS[0]), ours[0], rtol=1e-4, atol=1e-4)

  assert os.path.isfile(os.path.join(out, "tokenizer.model"))
  text = "add: 3+4"
  assert load_tokenizer(out).encode(text) == tok.encode(text)


@pytest.mark.slow  # a training run
def test_export_of_an_earlier_step(sft_run, tmp_path):
  out = str(tmp_path / "hf2")
  assert export.main([sft_run, out, "--step=2"]) == 0
  _, state = read_checkpoint(os.path.join(sft_run, "checkpoints"), 2)
  _, latest = read_checkpoint(os.path.join(sft_run, "checkpoints"))
  _, params = load_pretrained(out)
  for x, y in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(latest["params"]["layers"]["q"]["kernel"], params["layers"]["q"]["kernel"])


@pytest.mark.slow  # a training run
def test_lora_export_is_the_merged_model(lora_run, tmp_path, capsys):
  out = str(tmp_path / "hf")
  assert export.main([lora_run, out]) == 0
  assert "LoRA adapters merged" in capsys.readouterr().out
  evals = {r["step"]: r["eval_loss"] for r in read_metrics(lora_run) if "eval_loss" in r}
  assert sorted(evals) == [0, 3] and evals[3] != evals[0]  # evaluation sees the adapters
  cfg, base = workdir_lib.read_lora(lora_run)
  _, state = read_checkpoint(os.path.join(lora_run, "checkpoints"))
  merged = lora.merge(base, state["params"], cfg)
  c = _model_config(lora_run)
  config2, params2 = load_pretrained(out)
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(x), y)
  np.testing.assert_array_equal(np.asarray(lm_logits(config2, params2, TOKENS)),
                                np.asarray(lm_logits(c, merged, TOKENS)))
  # independently: exported W = base W + (alpha / r) A B in float64, for a 2-axis output
  # (q) and a 2-axis input (o) kernel; the adapters did move
  assert cfg.scale == 1.5
  for name, n_in in (("q", 1), ("o", 2), ("down", 1)):
    W = np.asarray(base["layers"][name]["kernel"], np.float64)
    A = np.asarray(state["params"]["lora"]["layers"][name]["a"], np.float64)
    B = np.asarray(state["params"]["lora"]["layers"][name]["b"], np.float64)
    L = W.shape[0]
    want = W + 1.5 * np.einsum("lir,lro->lio", A.reshape(L, -1, 2), B.reshape(L, 2, -1)
                               ).reshape(W.shape)
    got = params2["layers"][name]["kernel"]
    assert np.abs(want - W).max() > 1e-4, name
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
  for x, y in ((base["embed"]["embedding"], params2["embed"]["embedding"]),
               (base["layers"]["mlp_norm"]["scale"], params2["layers"]["mlp_norm"]["scale"])):
    np.testing.assert_array_equal(x, y)  # not adapted: the base, bit for bit


@pytest.mark.slow  # a training run
def test_export_refuses_to_overwrite_unless_asked(sft_run, tmp_path, capsys):
  out = tmp_path / "taken"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  assert export.main([sft_run, str(out)]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and str(out) in err and "--overwrite" in err
  assert len(err.strip().splitlines()) == 1
  assert sorted(os.listdir(out)) == ["keep.txt"]
  assert export.main([sft_run, str(out), "--overwrite"]) == 0
  assert (out / "config.json").is_file() and (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow  # a training run
def test_export_errors_name_the_path(sft_run, tmp_path, capsys):
  def err_of(*argv):
    assert export.main(list(argv)) == 1
    e = capsys.readouterr().err
    assert e.startswith("error: ") and len(e.strip().splitlines()) == 1, e
    return e

  missing = str(tmp_path / "nope")
  assert missing in err_of(missing, str(tmp_path / "o1"))
  plain = tmp_path / "plain"
  plain.mkdir()
  e = err_of(str(plain), str(tmp_path / "o2"))
  assert str(plain) in e and "not a run workdir" in e
  e = err_of(sft_run, str(tmp_path / "o3"), "--step=99")
  assert "step 99" in e and "[2, 3]" in e and sft_run in e
  assert not os.path.exists(tmp_path / "o3")
  assert "must not be the workdir" in err_of(sft_run, sft_run)


def test_reward_model_workdir_is_refused(tmp_path, capsys):
  import jax.numpy as jnp

  from rlhf_jax.checkpoint import Checkpointer
  from rlhf_jax.models import init_scalar_params
  c = ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4,
                  d_ff=16)
  wd = tmp_path / "rm"
  wd.mkdir()
  (wd / "model_config.json").write_text(json.dumps(c.to_dict()))
  ck = Checkpointer(str(wd / "checkpoints"), 1, 1, async_save=False)
  shapes = jax.eval_shape(lambda: init_scalar_params(c, jax.random.PRNGKey(0)))
  ck.maybe_save(1, {"step": jnp.ones((), jnp.int32),
                    "params": jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)},
                force=True)
  ck.close()
  assert export.main([str(wd), str(tmp_path / "out")]) == 1
  e = capsys.readouterr().err
  assert "reward model" in e and str(wd) in e
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow  # a training run
def test_mistral_source_keeps_its_model_type(sft_run, tmp_path):
  import shutil
  src = tmp_path / "mistral_src"
  src.mkdir()
  (src / "config.json").write_text(json.dumps({"model_type": "mistral"}))
  wd = tmp_path / "run"
  shutil.copytree(sft_run, wd)
  cfg = json.load(open(wd / "config.json"))
  (wd / "config.json").write_text(json.dumps({**cfg, "init_from": str(src)}))
  assert export.source_model_type(str(wd)) == "mistral"
  assert export.main([str(wd), str(tmp_path / "out")]) == 0
  hf = json.load(open(tmp_path / "out" / "config.json"))
  assert hf["model_type"] == "mistral" and hf["architectures"] == ["MistralForCausalLM"]
  _, params = load_pretrained(tmp_path / "out")  # reads back as the same weights
  _, state = read_checkpoint(os.path.join(sft_run, "checkpoints"))
  np.testing.assert_array_equal(params["layers"]["q"]["kernel"],
                                state["params"]["layers"]["q"]["kernel"])
