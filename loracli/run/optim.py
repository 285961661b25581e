"""Optimizer and LR-scheduler construction, resolved the way sd-scripts resolves them (§4, §5).

Optional packages (bitsandbytes, dadaptation, prodigyopt, transformers) are imported
only when their optimizer is asked for. The warnings sd-scripts prints (low lr for
adaptive optimizers, Adafactor hints) are lint findings at plan time, not repeated here.
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Mapping

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from loracli.errors import ConfigError, Problem, TrainingError
from loracli.lint import adafactor_uses_relative_step, is_adaptive  # noqa: F401  (shared with the plan side)

WHERE = "optimizer.optimizer_type"

# Canonical spelling → (module, class). Matching is case-insensitive, as in sd-scripts.
_KNOWN: dict[str, tuple[str, str]] = {
    "AdamW": ("torch.optim", "AdamW"),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit"),
    "PagedAdamW8bit": ("bitsandbytes.optim", "PagedAdamW8bit"),
    "PagedAdamW": ("bitsandbytes.optim", "PagedAdamW"),
    "PagedAdamW32bit": ("bitsandbytes.optim", "PagedAdamW32bit"),
    "Lion8bit": ("bitsandbytes.optim", "Lion8bit"),
    "PagedLion8bit": ("bitsandbytes.optim", "PagedLion8bit"),
    "Lion": ("lion_pytorch", "Lion"),
    "SGDNesterov": ("torch.optim", "SGD"),
    "SGDNesterov8bit": ("bitsandbytes.optim", "SGD8bit"),
    "DAdaptation": ("dadaptation.experimental", "DAdaptAdamPreprint"),
    "DAdaptAdamPreprint": ("dadaptation.experimental", "DAdaptAdamPreprint"),
    "DAdaptAdam": ("dadaptation", "DAdaptAdam"),
    "DAdaptAdaGrad": ("dadaptation", "DAdaptAdaGrad"),
    "DAdaptAdan": ("dadaptation", "DAdaptAdan"),
    "DAdaptAdanIP": ("dadaptation.experimental", "DAdaptAdanIP"),
    "DAdaptLion": ("dadaptation", "DAdaptLion"),
    "DAdaptSGD": ("dadaptation", "DAdaptSGD"),
    "Prodigy": ("prodigyopt", "Prodigy"),
    "AdaFactor": ("transformers.optimization", "Adafactor"),
}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(_KNOWN)
_BY_LOWER = {name.lower(): name for name in _KNOWN}

# pip package to suggest when an import fails
_PACKAGES = {
    "bitsandbytes": "bitsandbytes",
    "dadaptation": "dadaptation",
    "prodigyopt": "prodigyopt",
    "transformers": "transformers",
    "lion_pytorch": "lion-pytorch",
}

SCHEDULER_NAMES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                   "adafactor")


def canonical_optimizer_name(optimizer_type: str) -> str | None:
    """The canonical spelling of a built-in name (any case), or None for other names."""
    return _BY_LOWER.get(optimizer_type.lower())


def _import(module_name: str, optimizer_type: str):
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        top = module_name.split(".")[0]
        package = _PACKAGES.get(top, top)
        hint = f"install it with `pip install {package}`"
        if canonical_optimizer_name(optimizer_type) == "Lion":
            hint += ", or use optimizer_type = \"Lion8bit\" (bitsandbytes)"
        raise TrainingError(Problem(WHERE, f"{optimizer_type} needs the package {package}, which is not installed",
                                    hint)) from exc


def resolve_optimizer_class(optimizer_type: str) -> type:
    """The optimizer class for a built-in name, a torch.optim class name, or a dotted module.Class."""
    canonical = canonical_optimizer_name(optimizer_type or "AdamW")
    if canonical is not None:
        module_name, class_name = _KNOWN[canonical]
        return getattr(_import(module_name, canonical), class_name)
    if optimizer_type.lower().startswith("dadapt"):
        raise ConfigError(Problem(WHERE, f"unknown D-Adaptation optimizer {optimizer_type!r}",
                                  "use one of " + ", ".join(n for n in OPTIMIZER_NAMES if n.startswith("DAdapt"))))
    if "." in optimizer_type:
        module_name, _, class_name = optimizer_type.rpartition(".")
        module = _import(module_name, optimizer_type)
        where_found = module_name
    else:
        # Any other bare name is looked up in torch.optim with its original spelling.
        module, class_name, where_found = torch.optim, optimizer_type, "torch.optim"
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ConfigError(Problem(WHERE, f"unknown optimizer {optimizer_type!r} (no class {class_name} in "
                                         f"{where_found})",
                                  "use one of " + ", ".join(OPTIMIZER_NAMES)
                                  + ", a torch.optim class name, or a dotted module.Class path"))
    return cls


def ss_optimizer_string(cls: type, kwargs: Mapping[str, object]) -> str:
    """`<module>.<Class>(k=v,...)`, what sd-scripts records as ss_optimizer."""
    name = f"{cls.__module__}.{cls.__name__}"
    if kwargs:
        name += "(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
    return name


def _all_on_cuda(param_groups: list[dict]) -> bool:
    params = [p for g in param_groups for p in g["params"]]
    return bool(params) and all(p.is_cuda for p in params)


def build_optimizer(
    optimizer_type: str,
    param_groups: list[dict],
    learning_rate: float | None,
    optimizer_args: Mapping[str, object],
) -> tuple[Optimizer, str]:
    """(optimizer, ss_optimizer string). optimizer_args are typed TOML values; lists become tuples."""
    canonical = canonical_optimizer_name(optimizer_type or "AdamW")
    cls = resolve_optimizer_class(optimizer_type or "AdamW")
    # `kwargs` is what sd-scripts logs; `extra` is passed but not logged (nesterov).
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in optimizer_args.items()}
    extra: dict[str, object] = {}
    lr = learning_rate
    groups = param_groups

    if canonical in ("SGDNesterov", "SGDNesterov8bit"):
        if "momentum" not in kwargs:
            kwargs["momentum"] = 0.9  # Nesterov needs momentum
        if canonical == "SGDNesterov":
            extra["nesterov"] = True
        # sd-scripts rebuilds the 8-bit one without nesterov=True (bnb ignores it anyway).
    elif canonical == "AdaFactor":
        if "relative_step" not in kwargs:
            kwargs["relative_step"] = True
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            # Adafactor computes its own lr: no default lr and no per-group lrs.
            lr = None
            groups = [{k: v for k, v in g.items() if k != "lr"} for g in param_groups]

    if canonical == "AdamW" and not {"fused", "foreach"} & set(kwargs) and _all_on_cuda(groups):
        extra["fused"] = True  # one kernel for every tensor's update; not recorded, like nesterov above
    call_kwargs = {**kwargs, **extra}
    if lr is not None or canonical == "AdaFactor":
        call_kwargs["lr"] = lr
    try:
        # dadaptation and prodigyopt print "Using decoupled weight decay" on stdout: noise in a run's output
        with contextlib.redirect_stdout(io.StringIO()):
            optimizer = cls(groups, **call_kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(Problem("optimizer.optimizer_args", f"{cls.__name__} rejected its arguments: {exc}",
                                  "check the names and values in optimizer_args")) from exc
    return optimizer, ss_optimizer_string(cls, kwargs)


def build_scheduler(
    name: str,
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    num_cycles: int,
    power: float,
    adafactor_initial_lr: float | None,
) -> LRScheduler:
    """The LR schedule: diffusers' get_scheduler, or transformers' AdafactorSchedule for "adafactor"."""
    base, _, suffix = name.partition(":")  # also accept sd-scripts' "adafactor:<lr>"
    if base in ("constant", "adafactor") and num_warmup_steps:
        raise ConfigError(Problem("optimizer.lr_warmup_steps",
                                  f"the {base} scheduler takes no warmup (got {num_warmup_steps})",
                                  "set lr_warmup_steps = 0 or use constant_with_warmup"))
    if base == "adafactor":
        from transformers.optimization import Adafactor, AdafactorSchedule

        initial_lr = float(suffix) if suffix else adafactor_initial_lr
        if initial_lr is None or not isinstance(getattr(optimizer, "optimizer", optimizer), Adafactor):
            raise ConfigError(Problem("optimizer.lr_scheduler",
                                      "the adafactor scheduler needs the Adafactor optimizer with relative_step",
                                      "use optimizer_type = \"AdaFactor\", or another scheduler"))
        return AdafactorSchedule(optimizer, initial_lr)
    if base not in SCHEDULER_NAMES:
        raise ConfigError(Problem("optimizer.lr_scheduler", f"unknown scheduler {name!r}",
                                  "use one of " + ", ".join(SCHEDULER_NAMES)))
    from diffusers.optimization import get_scheduler

    # polynomial: diffusers' lr_end default is 1e-7, the same as transformers' (what sd-scripts uses).
    return get_scheduler(base, optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps,
                         num_cycles=num_cycles, power=power)


def current_lrs(optimizer, scheduler) -> dict[str, float]:
    """lr per param group (by its "name", else groupN). For DAdapt*/Prodigy the effective d·lr
    comes first as "d*lr/<name>", so the first value is always the lr the step really used."""
    groups = optimizer.param_groups
    last = scheduler.get_last_lr() if scheduler is not None else [g["lr"] for g in groups]
    out: dict[str, float] = {}
    for i, group in enumerate(groups):
        name = str(group.get("name") or f"group{i}")
        lr = float(last[i]) if i < len(last) and last[i] is not None else float(group.get("lr") or 0.0)
        if "d" in group and group.get("lr") is not None:
            out[f"d*lr/{name}"] = float(group["d"]) * float(group["lr"])
        out[name] = lr
    return out
