"""Decoder LM, scalar heads, LoRA adapters and pretrained-weight conversion."""
from rlhf_jax.models.transformer import ModelConfig, Transformer, init_cache, init_params
from rlhf_jax.models.segments import positions_from_segments, segment_causal_mask
from rlhf_jax.models.api import lm_logits
from rlhf_jax.models.pretrained import load_pretrained, save_pretrained, import_checkpoint
from rlhf_jax.models.heads import (ScalarHead, ScalarModel, backbone_params_from_lm,
                                   init_scalar_params, last_token_score)
from rlhf_jax.models import lora
from rlhf_jax.models.lora import LoraConfig
