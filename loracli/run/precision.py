"""Where the trained state lives: full_fp16 / full_bf16 (sd-scripts' experimental "full" half precision).

With either, the network, its gradients and the optimizer state are in the half type; mixed precision
alone keeps them in fp32. fp16 gradients need torch's GradScaler to accept them (it refuses to unscale
fp16 gradients by default): sd-scripts patches the scaler, and so do we.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def network_dtype(full_fp16: bool, full_bf16: bool, mixed_precision: str,
                  log: Callable[[str], None]) -> torch.dtype | None:
    """The dtype the network trains in (None: as built, fp32). `mixed_precision` is the effective one:
    fp16 asked on a CPU ran as "no", and full_fp16 then falls back to fp32 with it (one warning)."""
    if full_fp16:
        if mixed_precision == "fp16":
            return torch.float16
        log("warning: training.full_fp16 needs fp16 mixed precision, which needs a CUDA GPU; "
            "the network trains in fp32 on this CPU")
        return None
    if full_bf16:  # the plan guarantees bf16 mixed precision (E30), which also runs on a CPU
        return torch.bfloat16
    return None


def allow_fp16_unscale(scaler: Any) -> None:
    """Let a GradScaler unscale fp16 gradients (it raises "Attempting to unscale FP16 gradients."
    otherwise): full_fp16's gradients are fp16 by design. No scaler (a CPU, bf16): nothing to do."""
    if scaler is None:
        return
    original = scaler._unscale_grads_

    def unscale_fp16_too(optimizer, inv_scale, found_inf, allow_fp16):
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_fp16_too
