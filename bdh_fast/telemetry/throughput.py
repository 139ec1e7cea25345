"""The inputs of MFU: training FLOPs per token (BDH.md) and the accelerator's peak TFLOP/s."""

from __future__ import annotations

import torch

from bdh_fast.model import BDHConfig

# Dense peak TFLOP/s by device-name substring (first match wins) and autocast dtype.
# float32 training allows TF32, so its peak is the TF32 tensor-core figure.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.5}),
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.5}),
    ("GH200", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.5}),
    ("B200", {"bfloat16": 2250.0, "float16": 2250.0, "float32": 1100.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("A10G", {"bfloat16": 70.0, "float16": 70.0, "float32": 35.0}),
    ("L40S", {"bfloat16": 362.0, "float16": 362.0, "float32": 183.0}),
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 60.0}),
    ("RTX 4090", {"bfloat16": 165.0, "float16": 165.0, "float32": 82.6}),
    ("RTX 3090", {"bfloat16": 71.0, "float16": 71.0, "float32": 35.6}),
    ("V100", {"float16": 125.0, "float32": 15.7}),
    ("T4", {"float16": 65.0, "float32": 8.1}),
]


def flops_per_token(config: BDHConfig, block_size: int) -> float:
    """Training FLOPs per token (forward + backward), BDH.md's formula: the shared weights are
    applied L times and attention is the full T x T product the reference computes."""
    L, D, V = config.n_layer, config.n_embd, config.vocab_size
    nh, N, n = config.n_head, config.neurons_per_head, config.n_neurons
    dense = 2 * L * 3 * n * D + 2 * D * V
    attention = 2 * L * block_size * nh * (N + D)
    return 3.0 * (dense + attention)


def peak_tflops(device: torch.device, dtype: str, override: float | None = None) -> float | None:
    """Peak TFLOP/s for MFU: the override, else the table by GPU name; None when unknown (CPU)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, by_dtype in PEAK_TFLOPS:
        if key in name:
            return by_dtype.get(dtype)
    return None
