"""Scalar heads on the decoder LM: reward models and value functions.

    v_bt = w . h_bt + c          h_BTD = final-norm hidden states of `Transformer`

`ScalarModel` = `Transformer` backbone (output="hidden") + `ScalarHead`; it
gives one float32 value per token. A reward model reads the value at the last
real token of each sequence (`last_token_score`, as in Ouyang et al. 2022,
InstructGPT; Stiennon et al. 2020); a PPO value function uses every token.

Parameter tree: {"backbone": <LM params without "lm_head">, "head": {"dense":
{"kernel" [D, 1], "bias" [1]}}}, so a reward/value model starts from an SFT
checkpoint with `backbone_params_from_lm`. The backbone never unembeds, so it
is built with tied embeddings (no `lm_head` parameter) whatever the LM config.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.transformer import ModelConfig, Transformer

Array = jax.Array


class ScalarHead(nn.Module):
  """Dense(1) over hidden states -> float32 values [..., T] (last axis dropped).

  Computed in float32 whatever the backbone dtype. Kernel init N(0, 1/(D+1))
  by default, as in the reward head of Ziegler et al. 2019
  (lm-human-preferences); `init_std=0.0` gives a zero init (common for value
  heads). Logical axes: kernel ("embed", None), bias (None,).
  """

  init_std: float | None = None

  @nn.compact
  def __call__(self, h_BTD: Array) -> Array:
    D = h_BTD.shape[-1]
    std = 1.0 / math.sqrt(D + 1) if self.init_std is None else self.init_std
    kernel_init = nn.initializers.normal(std) if std > 0 else nn.initializers.zeros
    v_BT1 = nn.Dense(
        1, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32, name="dense",
        kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
    )(h_BTD.astype(jnp.float32))
    return v_BT1[..., 0]


def backbone_config(config: ModelConfig) -> ModelConfig:
  """The LM config as used by the scalar-model backbone (no unembedding)."""
  return dataclasses.replace(config, tie_embeddings=True)


class ScalarModel(nn.Module):
  """Decoder backbone + scalar head: per-token float32 values [B, T].

  __call__(tokens_BT, segment_ids_BT=None, positions_BT=None) -> values_BT;
  segment ids / positions as in `Transformer` (0 = padding; packing allowed).
  Values at padding positions are meaningless; mask them.
  """

  config: ModelConfig
  head_init_std: float | None = None

  @nn.compact
  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None) -> Array:
    h_BTD, _ = Transformer(backbone_config(self.config), name="backbone")(
        tokens_BT, segment_ids_BT, positions_BT, output="hidden")
    return ScalarHead(self.head_init_std, name="head")(h_BTD)


def init_scalar_params(config: ModelConfig, rng, head_init_std: float | None = None,
                       boxed: bool = False):
  """Random float32 ScalarModel parameters (plain pytree unless `boxed`)."""
  variables = ScalarModel(config, head_init_std).init(rng, jnp.zeros((1, 2), jnp.int32))
  params = variables["params"]
  return params if boxed else nn.meta.unbox(params)


def backbone_params_from_lm(lm_params: dict[str, Any]) -> dict[str, Any]:
  """LM parameters minus `lm_head`: the "backbone" subtree of a ScalarModel."""
  return {k: v for k, v in lm_params.items() if k != "lm_head"}


def last_token_score(values_BT: Array, mask_BT: Array) -> Array:
  """float32 [B]: values_BT[b, t_b] with t_b the last index where mask_BT[b] != 0.

  Works for left padding (t_b = T-1), right padding and ragged masks alike;
  rows with an all-zero mask score 0.
  """
  if values_BT.ndim != 2 or values_BT.shape != mask_BT.shape:
    raise ValueError(f"values {values_BT.shape} and mask {mask_BT.shape} must both be [B, T]")
  T = mask_BT.shape[1]
  real_BT = mask_BT != 0
  last_B = T - 1 - jnp.argmax(real_BT[:, ::-1], axis=1)
  score_B = jnp.take_along_axis(values_BT, last_B[:, None], axis=1)[:, 0]
  return jnp.where(real_BT.any(axis=1), score_B, 0.0).astype(jnp.float32)
