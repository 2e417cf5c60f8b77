"""FLOPs per training image, and model FLOPs utilisation (MFU) against the accelerator's peak.

FLOPs are counted once, on a forward and backward of the objective's loss, by PyTorch's own
`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and attention; elementwise work is not counted).
The count runs on a copy of the model on the meta device (shapes only): attention there takes the plain math path,
so it counts the model's FLOPs whatever kernel the hardware uses (on CPU, the fused attention's backward is not
counted at all; on GPUs, flash attention's recomputation would be), and it costs no memory.
"""

from __future__ import annotations

import torch

# Dense peak TFLOP/s per GPU for (bf16/fp16 tensor cores, fp32 without TF32), from the vendors' data sheets.
# Matched by substring of torch.cuda.get_device_name(); the first match wins, so specific names come first.
PEAK_TFLOPS = (
    ("H200", 989.4, 66.9),
    ("H100 PCIe", 756.0, 51.2),
    ("H100", 989.4, 66.9),
    ("A100", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
    ("L4", 121.0, 30.3),
    ("RTX 4090", 165.2, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("V100", 125.0, 15.7),
    ("T4", 65.0, 8.1),
)


def peak_tflops(device: torch.device, mixed_precision: str | None) -> float | None:
    """The device's peak TFLOP/s for this precision, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, fp32 in PEAK_TFLOPS:
        if key in name:
            return half if mixed_precision in ("bf16", "fp16") else fp32
    return None


def training_flops_per_image(model, objective, x0: torch.Tensor, cond, generator: torch.Generator) -> float:
    """FLOPs of one forward + backward of the loss, per image (or clip) of the batch `x0`; leaves no gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        objective.loss(model, x0, cond, generator).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x0.shape[0]


def _to_meta(value):
    if torch.is_tensor(value):
        return value.to("meta")
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def model_flops_per_image(model, objective, x0: torch.Tensor, cond, generator: torch.Generator) -> float:
    """`training_flops_per_image` of `model` (a diffusers-style model, rebuilt from its config on the meta device)
    for inputs shaped like `x0` and `cond`."""
    with torch.device("meta"):
        meta = type(model).from_config(dict(model.config))
    return training_flops_per_image(meta, objective, _to_meta(x0), _to_meta(cond), generator)
