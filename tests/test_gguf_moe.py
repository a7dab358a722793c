"""Mixtral GGUFs as llama.cpp's converter writes them (architecture llama with expert metadata,
router ffn_gate_inp, experts stacked (E, out, in) per projection; and the older per-expert
tensors). transformers' GGUF loader reads such a file as a dense Llama and drops the experts,
so the references are transformers on the Hugging Face folder (float32), or on the same
folder with each weight rounded as the file stores it (quantized)."""

import gguf
import numpy as np
import pytest
from conftest import caches, greedy, hf_greedy, hf_logits, rel_err
from gguf_writer import F32, stored, write_gguf

from mpinfer.errors import UserError
from mpinfer.model import Decoder
from mpinfer.weights import open_checkpoint

IDS = [int(t) for t in np.random.default_rng(3).integers(3, 300, 40)]
LAYOUTS = {"stacked": True, "per_expert": False}


def logits(model, ids):
    return model.forward(ids, caches(model), [len(ids)], all_logits=True)


def transformers_as_stored(folder, qtype):
    """transformers' Mixtral from the folder, every weight replaced by what the GGUF holds:
    quantized and dequantized by the gguf library, the router left in float32. Quantization
    works along rows, so the Q/K row permutation and the stacking of experts do not change it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            data, kind = stored(p.numpy(), F32 if name.endswith("mlp.gate.weight") else qtype)
            p.copy_(torch.from_numpy(gguf.quants.dequantize(data, kind).reshape(p.shape)))
    return model


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_mixtral_gguf_matches_safetensors_and_transformers(layout, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tiny_model("mixtral")
    ours = Decoder.load(write_gguf(folder, str(tmp_path / "m.gguf"), stacked=LAYOUTS[layout]))
    hf = Decoder.load(folder)
    moe = ("arch", "num_experts", "experts_per_token", "expert_size", "norm_topk_prob", "moe_layers")
    assert [getattr(ours.config, f) for f in moe] == [getattr(hf.config, f) for f in moe]
    assert ours.config.num_experts == 4 and ours.config.arch == "mixtral"
    err = rel_err(logits(ours, IDS), logits(hf, IDS))
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    ref_err = rel_err(logits(ours, IDS), hf_logits(ref, IDS))
    print(f"{layout}: max rel err {err:.2e} against the safetensors folder, {ref_err:.2e} against transformers")
    assert err <= 1e-5 and ref_err <= 1e-4
    assert greedy(ours, IDS, 32) == hf_greedy(ref, IDS, 32)


@pytest.mark.parametrize("qtype,layout", [("Q8_0", "stacked"), ("Q4_0", "stacked"), ("Q8_0", "per_expert")])
def test_quantized_mixtral_gguf_matches_transformers(qtype, layout, tiny_model, tmp_path):
    folder = tiny_model("mixtral")
    kind = gguf.GGMLQuantizationType[qtype]
    path = write_gguf(folder, str(tmp_path / "m.gguf"), kind, stacked=LAYOUTS[layout])
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    if layout == "stacked":  # every expert projection quantized (the expert size, 160, is whole blocks)
        assert {types[f"blk.0.ffn_{p}_exps.weight"] for p in ("gate", "up", "down")} == {kind}
    ours = Decoder.load(path)
    ref = transformers_as_stored(folder, kind)
    err = rel_err(logits(ours, IDS), hf_logits(ref, IDS))
    print(f"{qtype} {layout}: max rel err {err:.2e}")
    assert err <= 1e-4
    assert greedy(ours, IDS, 32) == hf_greedy(ref, IDS, 32)


def test_one_quantized_expert_reads_only_its_rows(tiny_model, tmp_path):
    """A tensor-parallel rank's rows of expert 2's up projection: only those Q8_0 bytes are
    read, and they dequantize to the rows of the whole stacked tensor."""
    path = write_gguf(tiny_model("mixtral"), str(tmp_path / "m.gguf"), gguf.GGMLQuantizationType.Q8_0)
    ckpt = open_checkpoint(path)
    w = ckpt.get("model.layers.1.block_sparse_moe.experts.2.w3.weight", (160, 96), rows=slice(80, 160))
    assert ckpt.bytes_read == 80 * 3 * 34  # 80 rows of 3 blocks of 32 values in 34 bytes
    [t] = [t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_up_exps.weight"]
    whole = gguf.quants.dequantize(t.data, t.tensor_type)  # (E, I, D)
    np.testing.assert_array_equal(w, whole[2, 80:160])
    down = ckpt.get("model.layers.1.block_sparse_moe.experts.3.w2.weight", (96, 160), cols=slice(0, 80))
    [t] = [t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_down_exps.weight"]
    np.testing.assert_array_equal(down, gguf.quants.dequantize(t.data, t.tensor_type)[3, :, :80])  # (E, D, I)


@pytest.mark.parametrize("layout,name,shape,message", [
    ("stacked", "blk.1.ffn_down_exps.weight", (4, 96, 159),
     "tensor 'blk.1.ffn_down_exps.weight' has shape (4, 96, 159), expected (4, 96, 160) (experts, out, in)"),
    ("stacked", "blk.0.ffn_gate_exps.weight", (3, 160, 96),
     "tensor 'blk.0.ffn_gate_exps.weight' has shape (3, 160, 96), expected (4, 160, 96) (experts, out, in)"),
    ("per_expert", "blk.2.ffn_up.1.weight", (159, 96),
     "tensor 'model.layers.2.block_sparse_moe.experts.1.w3.weight' has shape (159, 96), expected (160, 96)"),
])
def test_expert_tensor_of_wrong_shape(layout, name, shape, message, tiny_model, tmp_path):
    path = write_gguf(tiny_model("mixtral"), str(tmp_path / "m.gguf"), stacked=LAYOUTS[layout],
                      replace={name: np.zeros(shape, np.float32)})
    with pytest.raises(UserError) as e:
        Decoder.load(path)
    assert str(e.value) == f"{path}: {message}"


def test_stacked_experts_without_expert_count(tiny_model, tmp_path):
    path = write_gguf(tiny_model("llama_gguf"), str(tmp_path / "m.gguf"),
                      replace={"blk.0.ffn_up_exps.weight": np.zeros((4, 160, 96), np.float32)})
    with pytest.raises(UserError) as e:
        Decoder.load(path)
    assert str(e.value) == (f"{path}: tensor 'blk.0.ffn_up_exps.weight' holds experts, "
                            "but the metadata has no llama.expert_count")
