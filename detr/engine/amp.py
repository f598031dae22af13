"""What ``train.amp=auto`` means on the device at hand: bfloat16 autocast where the hardware computes
bfloat16 natively, float32 elsewhere.

bfloat16 pays only with hardware support: CUDA devices of compute capability 8.0 and later, and CPUs
with AMX-BF16 or AVX512-BF16, whose oneDNN convolutions and matrix products run about twice as fast in
it (the `detr_tiny` training step 1.46x with a channels-last ResNet, configs/README.md). Without it the same
operators fall back to slow conversion paths, so ``auto`` keeps float32 there.
"""

from __future__ import annotations

import torch

AMP_CHOICES = ("none", "bf16", "fp16", "auto")


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16 on this CPU: the instruction sets oneDNN computes bfloat16 with."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def resolve_amp(amp: str, device: torch.device) -> str:
    """``amp`` with ``auto`` replaced by ``bf16`` or ``none`` for ``device``; other values unchanged."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "none"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "none"
    return "none"
