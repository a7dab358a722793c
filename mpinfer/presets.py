"""What the planner knows without measuring: GPUs, interconnects and models by name.

Figures are vendor peak numbers (dense 16-bit tensor FLOP/s, HBM bandwidth, link bandwidth
per GPU per direction); planner.py applies the efficiencies. A calibration profile
(calibrate.py) replaces the link figures with what the actual cluster measured.

Latencies are per message as a GPU collective library sees them, not the wire's: NCCL's
own tuning model (src/graph/tuning.cc, hwLat / baseLat) charges a ring step about 0.5 us on
NVLink, 1 us on PCIe and 2.7 us on the network (LL protocol) plus a few us of launch per
collective; we fold that launch into the step (0.8 us NVLink, so an 8-GPU all-reduce of a
few KB costs 14 steps = 11 us, what nccl-tests show on H100 boxes) and charge a lone
point-to-point message about twice a step.
"""

import dataclasses

from .config import ModelConfig, RopeConfig

GB = 1e9


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    memory: float  # bytes of device memory
    flops: float  # peak dense 16-bit FLOP/s
    bandwidth: float  # peak memory bandwidth, bytes/s


@dataclasses.dataclass(frozen=True)
class Link:
    """One kind of connection between two GPUs (ranks). A message of n bytes takes
    latency + n / bandwidth; one step of a ring all-reduce takes step_latency + chunk /
    bus_bandwidth. Presets set the two pairs alike; a calibration fits them separately."""

    name: str
    latency: float  # s, a point-to-point message of 0 bytes
    bandwidth: float  # bytes/s per GPU per direction, point to point
    step_latency: float  # s, one step of a ring all-reduce
    bus_bandwidth: float  # bytes/s, a ring all-reduce's bus bandwidth (nccl-tests' busbw)


def _link(name, gbytes_per_s, step_us, p2p_us):
    return Link(name, p2p_us * 1e-6, gbytes_per_s * GB, step_us * 1e-6, gbytes_per_s * GB)


# Datasheets: H100 SXM5 (989 TFLOP/s BF16 dense, 3.35 TB/s HBM3, 80 GB), H200 SXM (same
# compute, 4.8 TB/s HBM3e, 141 GB), A100 SXM4 80GB (312 TFLOP/s, 2.04 TB/s), AMD MI300X
# (1307 TFLOP/s BF16 dense, 5.3 TB/s HBM3, 192 GB). Memory in decimal GB, as sold.
GPUS = {
    "h100": GPU("H100 SXM 80GB", 80 * GB, 989e12, 3.35e12),
    "h200": GPU("H200 SXM 141GB", 141 * GB, 989e12, 4.8e12),
    "a100": GPU("A100 SXM 80GB", 80 * GB, 312e12, 2.039e12),
    "mi300x": GPU("MI300X 192GB", 192 * GB, 1307e12, 5.3e12),
}

# Inside a node: NVLink 4 (H100: 18 links x 50 GB/s = 900 GB/s both ways, 450 per direction),
# PCIe Gen5 x16 (64 GB/s per direction). Between nodes, one NIC per GPU as in HGX/DGX
# designs: InfiniBand NDR 400 Gb/s = 50 GB/s, HDR 200 Gb/s = 25 GB/s; RoCE over 200 GbE
# (25 GB/s; 100 to 400 GbE are common) with a switch and host stack that add latency.
INTRA = {
    "nvlink": _link("NVLink 4", 450, 0.8, 2.0),
    "pcie5": _link("PCIe Gen5 x16", 64, 1.5, 3.0),
}
INTER = {
    "ib-ndr": _link("InfiniBand NDR 400 Gb/s", 50, 4.0, 8.0),
    "ib-hdr": _link("InfiniBand HDR 200 Gb/s", 25, 4.0, 8.0),
    "roce": _link("RoCE 200 GbE", 25, 6.0, 12.0),
}


def _dense(vocab, d, inter, layers, heads, kv_heads, theta):
    return ModelConfig(arch="llama", vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=d // heads, rms_eps=1e-5,
                       rope=RopeConfig(theta=theta), max_position=8192, sliding_windows=(0,) * layers)


def _mixtral(vocab, d, inter, layers, heads, experts, top):
    dense = _dense(vocab, d, inter, layers, heads, 8, 1e6)
    return dataclasses.replace(dense, arch="mixtral", num_experts=experts, experts_per_token=top, expert_size=inter,
                               moe_layers=(True,) * layers)


# Sizes from each model's Hugging Face config.json.
MODELS = {
    "llama3-8b": _dense(128256, 4096, 14336, 32, 32, 8, 5e5),
    "llama3-70b": _dense(128256, 8192, 28672, 80, 64, 8, 5e5),
    "llama3-405b": _dense(128256, 16384, 53248, 126, 128, 8, 5e5),
    "mixtral-8x7b": _mixtral(32000, 4096, 14336, 32, 32, 8, 2),
    "mixtral-8x22b": _mixtral(32768, 6144, 16384, 56, 48, 8, 2),
    # DeepSeek-V3's sizes (61 layers, d 7168, the first 3 dense with an 18432 MLP, then 256
    # routed experts of 2048, top 8, plus one shared expert of 2048; vocabulary 129280) with
    # grouped-query attention standing in for its latent attention (MLA, not a ModelConfig):
    # 128 heads of 128 and 2 KV heads cache 512 values per token and layer (MLA: 576) and
    # give 675B parameters, 41B active per token (DeepSeek-V3: 671B, 37B).
    "deepseek-v3-sized": dataclasses.replace(
        _dense(129280, 7168, 18432, 61, 128, 2, 1e4), arch="qwen2_moe", head_dim=128, num_experts=256,
        experts_per_token=8, expert_size=2048, shared_expert_size=2048, moe_layers=(False,) * 3 + (True,) * 58),
}
