"""The per-GPU memory formula of README's "Several GPUs" table: the activation measurement on a real (tiny) Wan
block, and the arithmetic of the terms."""
from __future__ import annotations

import math

import torch

from workbench.distributed.memory import Footprint, measure_block, per_gpu, wan_tokens
from workbench.models.random_pipelines import component_configs


def test_measured_block_terms_are_linear_in_tokens_and_cover_the_layer_inputs():
    cfg = component_configs("wan", "tiny")["transformer"]
    d, ffn = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"]
    trainable, c0, a, loss = measure_block(cfg, dtype=torch.float32, sizes=((4, 4), (4, 8)), text_tokens=8)
    # one learnable scale per output channel of the block's quantized linears (8 of width d, ffn up, ffn down)
    assert trainable == 8 * d + ffn + d
    # autograd keeps at least every quantized linear's input (self q/k/v share one; cross k/v read the text):
    # x (q,k,v), attention out, cross q, cross out, ffn in (d each) and the ffn's hidden (ffn), in fp32
    assert a >= (5 * d + ffn) * 4 and c0 > 0
    assert loss == 3 * d * 4  # the gathered outputs and the target (fp32 here) and the saved difference


def test_per_gpu_terms():
    f = Footprint(transformer=1000, block=100, text_encoder=50, vae=10, trainable=8, weights_bytes=7,
                  bytes_per_token=3.0, loss_bytes_per_token=1.0)
    one, four = per_gpu(f, 1, tokens=10, batch=8), per_gpu(f, 4, tokens=10, batch=8)
    assert one["resident"] == four["resident"] == 2 * (2 * 1000 + 50 + 10)  # replicated on every rank
    assert one["block"] == 2 * 100 * 2 and four["block"] == 2 * 100 * 1.25
    assert one["rows"] == 8 * 10 * 3 and four["rows"] == 2 * 10 * 3 and one["loss"] == four["loss"] == 80
    assert one["trainable"] == 16 * 8 + 8 * 8 and math.isclose(four["trainable"], 16 * 8 / 4 + 8 * 8)
    assert one["total"] == sum(v for k, v in one.items() if k != "total")
    assert wan_tokens() == 21 * 30 * 52 == 32_760  # 81 frames at 480 x 832
