"""Size/hardware presets: every config preset loads and validates, the model shapes are the
published ones, the meshes fill their hardware, and the memory estimate fits them."""
import importlib.util
from pathlib import Path

import jax
import pytest

from rlhf_jax import config as config_lib
from rlhf_jax import config_keys
from rlhf_jax import memory, memory_plan, presets
from rlhf_jax.launch import load_config
from rlhf_jax.models import init_params
from rlhf_jax import trainers

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("sft", "dpo", "rm", "grpo", "ppo")

# From each model's Hugging Face config.json (written out here independently of
# rlhf_jax/presets.py) and the model card's parameter count.
HF = {
    "smollm2_135m": dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         head_dim=64, d_ff=1536, rope_theta=1e5, rope_scaling=None,
                         norm_eps=1e-5, tie_embeddings=True, attn_bias=False, params=135e6),
    "llama3_2_1b": dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                        head_dim=64, d_ff=8192, rope_theta=5e5,
                        rope_scaling=(32.0, 1.0, 4.0, 8192), norm_eps=1e-5,
                        tie_embeddings=True, attn_bias=False, params=1.24e9),
    "qwen2_5_1_5b": dict(vocab_size=151936, d_model=1536, n_layers=28, n_heads=12,
                         n_kv_heads=2, head_dim=128, d_ff=8960, rope_theta=1e6,
                         rope_scaling=None, norm_eps=1e-6, tie_embeddings=True,
                         attn_bias=True, params=1.54e9),
    "llama3_8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      head_dim=128, d_ff=14336, rope_theta=5e5,
                      rope_scaling=(8.0, 1.0, 4.0, 8192), norm_eps=1e-5,
                      tie_embeddings=False, attn_bias=False, params=8.03e9),
    # Issue #20: google/gemma-3-1b-pt and google/gemma-2-2b (config.json, model cards).
    "gemma3_1b": dict(vocab_size=262144, d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1,
                      head_dim=256, d_ff=6912, rope_theta=1e6, rope_scaling=None,
                      norm_eps=1e-6, tie_embeddings=True, attn_bias=False, qk_norm=True,
                      post_norms=True, norm_offset=1.0, embed_scale=True,
                      activation="gelu_tanh", sliding_window=512,
                      local_layers=(True,) * 5 + (False,) + (True,) * 5 + (False,)
                      + (True,) * 5 + (False,) + (True,) * 5 + (False,) + (True,) * 2,
                      rope_local_theta=1e4, attn_softcap=0.0, final_softcap=0.0,
                      params=1.0e9),
    "gemma2_2b": dict(vocab_size=256000, d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4,
                      head_dim=256, d_ff=9216, rope_theta=1e4, rope_scaling=None,
                      norm_eps=1e-6, tie_embeddings=True, attn_bias=False, qk_norm=False,
                      post_norms=True, norm_offset=1.0, embed_scale=True,
                      activation="gelu_tanh", sliding_window=4096,
                      local_layers=(True, False) * 13, attn_softcap=50.0,
                      final_softcap=30.0, params=2.61e9),
}
DEVICES = {"v5e-8": 8, "v5p-32": 16, "8xH100": 8}  # jax.device_count() of each


def config_module(name):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def all_presets():
  out = []
  for name in CONFIGS:
    extra = ("gsm8k",) if name in ("grpo", "ppo") else ()
    out += [(name, p) for p in ("tiny", "1b", *extra, *config_module(name).SIZES)]
  return out


def test_every_config_has_every_size():
  for name in CONFIGS:
    assert set(config_module(name).SIZES) == set(presets.SIZES), name


@pytest.mark.parametrize("name,preset", all_presets())
def test_preset_loads_and_validates(name, preset):
  c = load_config(f"{REPO}/configs/{name}.py:{preset}")
  trainers.validate(c)
  m = config_lib.model_config(c, vocab_size=100)
  if preset in presets.SIZES:
    hw = config_module(name).SIZES[preset]["hardware"]
    assert tuple(c.mesh.shape) == presets.mesh_for(preset, hw)
    assert m.dtype == "bfloat16" and m.resolved_remat_policy == "full"
    assert c.distributed.enabled == (memory_plan.HARDWARE[hw].hosts > 1)


@pytest.mark.parametrize("size", list(HF))
def test_model_shapes_match_hugging_face(size):
  c = load_config(f"{REPO}/configs/sft.py:{size}")
  m = config_lib.model_config(c)
  want = dict(HF[size])
  published = want.pop("params")
  assert {k: getattr(m, k) for k in want} == want
  # Count the parameters of the real module (abstractly: no memory allocated).
  shapes = jax.eval_shape(lambda: init_params(m, jax.random.PRNGKey(0)))
  n = sum(x.size for x in jax.tree.leaves(shapes))
  assert n == memory.num_params(m)
  assert abs(n / published - 1) < 0.01, (n, published)


def test_1b_is_llama3_2_1b_on_any_device_count():
  a = load_config(f"{REPO}/configs/sft.py:1b")
  b = load_config(f"{REPO}/configs/sft.py:llama3_2_1b")
  assert a.model.to_dict() == b.model.to_dict()
  assert tuple(a.mesh.shape) == (1, -1, 1) and tuple(b.mesh.shape) == (1, 8, 1)


def test_meshes_fill_their_hardware():
  for name, hw in memory_plan.HARDWARE.items():
    assert hw.devices == DEVICES[name]
    assert hw.mesh[0] * hw.mesh[1] * hw.mesh[2] == hw.devices, name
    for size in presets.SIZES:
      d, f, t = presets.mesh_for(size, name)
      assert d * f * t == hw.devices
  assert presets.mesh_for("smollm2_135m", "v5e-8") == (8, 1, 1)  # data parallel
  assert presets.mesh_for("llama3_8b", "v5p-32") == (1, 16, 1)
  with pytest.raises(ValueError, match="unknown hardware 'v4-8'"):
    presets.mesh_for("llama3_8b", "v4-8")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_sized_preset_fits_its_hardware(name):
  for size, s in config_module(name).SIZES.items():
    c = load_config(f"{REPO}/configs/{name}.py:{size}")
    ok, est, budget = memory_plan.fits(c, s["hardware"])
    assert ok, (name, size, s["hardware"], est / 1e9, budget / 1e9)
    # The batch rows split evenly over the batch-sharding devices (data x fsdp).
    d, f, _ = c.mesh.shape
    rows = {"sft": c.batch_size // c.grad_accum_steps}.get(name, c.batch_size)
    if name in ("grpo", "ppo"):
      rows = c.rollout.train_micro_batch
    assert rows % (d * f) == 0, (name, size)


def test_too_big_combinations_do_not_fit():
  # Llama-3.1-8B on v5e-8: 16 bytes/param of AdamW state alone is 16 GB per chip.
  c = load_config(f"{REPO}/configs/sft.py:llama3_8b")
  c.mesh.shape = presets.mesh_for("llama3_8b", "v5e-8")
  ok, est, budget = memory_plan.fits(c, "v5e-8")
  assert not ok and est > 16e9 > budget
  # Replicating it (pure data parallelism) on 8xH100: 128 GB of state per GPU.
  c.mesh.shape = (8, 1, 1)
  assert not memory_plan.fits(c, "8xH100")[0]
  # Without remat, the T^2 attention activations of Llama-3.2-1B overflow v5e.
  c = load_config(f"{REPO}/configs/sft.py:llama3_2_1b")
  assert memory_plan.fits(c, "v5e-8")[0]
  c.model.remat = False
  assert not memory_plan.fits(c, "v5e-8")[0]


def test_remat_policy_is_a_config_knob():
  c = load_config(f"{REPO}/configs/sft.py:tiny")
  assert c.model.remat_policy == ""
  config_keys.check_overrides(["--config.model.remat_policy=dots_no_batch"], c)
  c.model.remat_policy = "dots_no_batch"
  assert config_lib.model_config(c, vocab_size=48).resolved_remat_policy == "dots_no_batch"
  c.model.remat_policy = "everything"
  with pytest.raises(config_lib.ConfigError, match="model.remat_policy='everything'"):
    config_lib.model_config(c, vocab_size=48)


def test_memory_benchmark_formula_tables_run():
  import subprocess
  import sys
  out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "memory.py"), "--formula"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| llama3_8b | 8.030B | 128.48 |" in out.stdout


# config.hardware: a size preset's mesh is a plan; "auto" adapts it to the devices present.

def _sized(name, size, **over):
  c = load_config(f"{REPO}/configs/{name}.py:{size}")
  if "train_path" in c.data:
    c.data.train_path = "unused.jsonl"  # validate(num_devices) asks for the run's data path
  for k, v in over.items():
    c[k] = v
  return c


@pytest.mark.parametrize("name", CONFIGS)
def test_size_preset_runs_on_one_device_with_auto(name, capsys):
  c = _sized(name, "smollm2_135m")
  assert c.hardware == "auto" and c.mesh.planned_for == "v5e-8"
  assert tuple(c.mesh.shape) == (8, 1, 1)
  trainers.validate(c, 1)
  assert tuple(c.mesh.shape) == (1, 1, 1)
  out = capsys.readouterr().out.strip().splitlines()
  assert out == ["mesh: [8, 1, 1] is planned for v5e-8 (8 devices), 1 device(s) here: using "
                 "data parallelism [1, 1, 1] (config.hardware=auto; --config.hardware=v5e-8 "
                 "requires the planned hardware)"]
  trainers.validate(c, 1)  # resolved once: validating again says nothing
  assert capsys.readouterr().out == ""


def test_auto_keeps_the_planned_mesh_on_its_hardware(capsys):
  c = _sized("sft", "llama3_2_1b")
  trainers.validate(c, 8)
  assert tuple(c.mesh.shape) == (1, 8, 1) and capsys.readouterr().out == ""


def test_auto_leaves_a_mesh_the_user_chose_alone():
  # Not a preset's plan (mesh.planned_for = ""): a mesh that does not fit is today's error.
  c = load_config(f"{REPO}/configs/sft.py:tiny")
  c.mesh.shape = (2, 1, 1)
  with pytest.raises(config_lib.ConfigError, match=r"needs 2 devices, but 1 device"):
    trainers.validate(c, 1)
  # ... and so is a preset whose mesh was overridden to another device count.
  c = _sized("sft", "smollm2_135m")
  c.mesh.shape = (4, 1, 1)
  with pytest.raises(config_lib.ConfigError, match=r"needs 4 devices, but 1 device"):
    trainers.validate(c, 1)


def test_named_hardware_must_be_present():
  c = _sized("grpo", "smollm2_135m", hardware="v5e-8")
  with pytest.raises(config_lib.ConfigError) as e:
    trainers.validate(c, 1)
  msg = str(e.value)
  assert msg.startswith("config.hardware='v5e-8' needs its 8 devices, but 1 device(s) are "
                        "available") and "--config.hardware=auto" in msg
  assert "\n" not in msg
  c = _sized("grpo", "smollm2_135m", hardware="v5e-8")
  trainers.validate(c, 8)
  assert tuple(c.mesh.shape) == (8, 1, 1)
  with pytest.raises(config_lib.ConfigError, match=r"config.hardware='v4-8': expected one of "
                                                   r"auto\|v5e-8\|v5p-32\|8xH100"):
    trainers.validate(_sized("sft", "tiny", hardware="v4-8"))


def test_named_hardware_replans_the_preset_mesh():
  c = _sized("sft", "llama3_8b", hardware="8xH100")  # planned for v5p-32: (1, 16, 1)
  trainers.validate(c, 8)
  assert tuple(c.mesh.shape) == presets.mesh_for("llama3_8b", "8xH100") == (1, 8, 1)
  c = _sized("sft", "smollm2_135m", hardware="v5p-32")  # data parallel stays so
  trainers.validate(c, 16)
  assert tuple(c.mesh.shape) == presets.mesh_for("smollm2_135m", "v5p-32") == (16, 1, 1)
