"""fp8_base: frozen base weights stored as float8_e4m3fn, computed in the mixed-precision dtype.

sd-scripts casts the whole UNet to fp8 and relies on CUDA autocast to upcast each weight as it is
used. loracli upcasts explicitly instead, so the result does not depend on which ops autocast
covers on a device: every Linear/Conv2d weight of the frozen model is kept in fp8 and read
through a parametrization that returns it in the compute dtype. Whoever reads `layer.weight`
(the layer's own forward, a LoRA/LyCORIS wrapper, DoRA's norm) gets the upcast copy.

An upcast copy that autograd keeps for the backward pass (a Linear needs its weight to pass the
gradient to its input, and everything after the first LoRA layer passes gradients) would hold
the weights in the compute dtype again until backward: with sd-scripts' autocast casts they are.
Here a saved-tensor hook keeps the fp8 tensor instead and upcasts it again when backward reads
it, so the device holds 1 byte per frozen weight plus the copies of the layers in flight.

Norm layers, biases and embeddings (a tiny share of the bytes) stay in the compute dtype: fp8 has
too few bits for their scales, and embeddings cannot be fp8 at all.

Apply it after the network is built: the network finds its target layers by class name, and a
parametrized layer's class is renamed by torch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

FP8 = torch.float8_e4m3fn
STORED = (nn.Linear, nn.Conv2d)
_SOURCE = "_loracli_fp8_source"  # on an upcast copy: the fp8 tensor it was made from


class Upcast(nn.Module):
    """The stored fp8 tensor, as the compute dtype (the copy remembers where it came from)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        copy = stored.to(self.dtype)
        setattr(copy, _SOURCE, stored)
        return copy


def _pack(tensor: torch.Tensor):
    source = getattr(tensor, _SOURCE, None)
    return (source, tensor.dtype) if source is not None else tensor


def _unpack(packed):
    if isinstance(packed, tuple):
        source, dtype = packed
        return source.to(dtype)
    return packed


def store_in_fp8(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Keep the Linear/Conv2d weights of a frozen model in fp8, read in compute_dtype; the other
    parameters are cast to compute_dtype. Returns how many weights are stored in fp8."""
    stored = 0
    for module in list(model.modules()):
        if not isinstance(module, STORED) or parametrize.is_parametrized(module, "weight"):
            continue
        module.weight.data = module.weight.data.to(FP8)
        # unsafe: the parametrization changes the dtype on purpose
        parametrize.register_parametrization(module, "weight", Upcast(compute_dtype), unsafe=True)
        stored += 1
    for param in model.parameters():  # what is not stored in fp8: biases, norms, embeddings
        if param.dtype != FP8:
            param.data = param.data.to(compute_dtype)
    _keep_fp8_for_backward(model)
    return stored


def _keep_fp8_for_backward(model: nn.Module) -> None:
    """While the model runs forward, tensors saved for backward that are upcast weights are kept as
    their fp8 source (and upcast again in backward)."""
    if getattr(model, "_loracli_fp8_hooks", False):
        return
    contexts: list[torch.autograd.graph.saved_tensors_hooks] = []

    def enter(module, args):
        context = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
        context.__enter__()
        contexts.append(context)

    def leave(module, args, output):
        if contexts:
            contexts.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)  # also when forward raises
    model._loracli_fp8_hooks = True


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: its fp8 weights' upcast dtype, else its parameters' dtype."""
    for module in model.modules():
        if isinstance(module, Upcast):
            return module.dtype
    return next(model.parameters()).dtype


def fp8_bytes(model: nn.Module) -> int:
    """Bytes of the fp8-stored tensors (1 per element)."""
    return sum(p.numel() for p in model.parameters() if p.dtype == FP8)
