"""Expert load statistics: every routed (token, expert) pair is counted once, and the counts
equal those from transformers' own router logits on the same prompt."""

import numpy as np
import pytest
import torch
from conftest import caches

from mpinfer.model import Decoder


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_expert_load_matches_transformers_router(arch, tiny_model):
    from transformers import AutoModelForCausalLM

    path = tiny_model(arch)
    ours = Decoder.load(path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = [int(t) for t in np.random.default_rng(5).integers(3, 300, 41)]
    ours.forward(ids[:25], caches(ours), [25])  # a 25-token sequence
    (cache,) = caches(ours)  # then all 41 tokens as another sequence, in two forward passes
    ours.forward(ids[:25], [cache], [25])
    ours.forward(ids[25:], [cache], [16])
    layers, load = ours.expert_load()
    cfg = ours.config
    assert layers == [i for i, moe in enumerate(cfg.moe_layers) if moe]
    # 25 + 41 tokens routed, each to experts_per_token experts
    assert load.sum(axis=1).tolist() == [(25 + 41) * cfg.experts_per_token] * len(layers)
    with torch.no_grad():
        router_logits = ref(torch.tensor([ids]), output_router_logits=True).router_logits
    top = [torch.topk(torch.softmax(r.float(), -1), cfg.experts_per_token, -1).indices.numpy() for r in router_logits]
    expected = [np.bincount(t.ravel(), minlength=cfg.num_experts) for t in top]
    first = np.array([np.bincount(t[:25].ravel(), minlength=cfg.num_experts) for t in top])  # the first call (T, A)
    np.testing.assert_array_equal(load, first + np.array(expected))  # (MoE layers, E)
