"""Optimizers and LR schedules resolve and behave as in sd-scripts (§4, §5), on CPU."""

from __future__ import annotations

import sys

import pytest
import torch

from loracli.errors import ConfigError, TrainingError
from loracli.run.optim import (
    OPTIMIZER_NAMES,
    adafactor_uses_relative_step,
    build_optimizer,
    build_scheduler,
    canonical_optimizer_name,
    current_lrs,
)


def make_groups(te_lr: float | None = 1e-3, unet_lr: float | None = 1e-3) -> list[dict]:
    torch.manual_seed(0)
    te, unet = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    groups = [{"params": list(te.parameters()), "name": "textencoder"},
              {"params": list(unet.parameters()), "name": "unet"}]
    for g, lr in zip(groups, (te_lr, unet_lr)):
        if lr is not None:
            g["lr"] = lr
    return groups


def train_steps(optimizer, groups, steps: int = 3, scheduler=None) -> float:
    """Run a few steps on a fixed regression problem; return how far the parameters moved."""
    params = [p for g in groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    for _ in range(steps):
        out = sum(torch.nn.functional.linear(x, *g_["params"]) for g_ in groups)
        loss = ((out - y) ** 2).mean()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return max((p.detach() - b).abs().max().item() for p, b in zip(params, before))


# --- construction and one step for each family --------------------------------------------------

def test_adamw_with_args_and_ss_string():
    groups = make_groups()
    opt, ss = build_optimizer("AdamW", groups, 1e-3, {"weight_decay": 0.01, "betas": [0.9, 0.99]})
    assert isinstance(opt, torch.optim.AdamW)
    assert ss == "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))"
    assert opt.defaults["betas"] == (0.9, 0.99)
    assert train_steps(opt, groups) > 0


def test_no_args_has_no_parentheses_and_names_are_case_insensitive():
    opt, ss = build_optimizer("adamw", make_groups(), 1e-3, {})
    assert ss == "torch.optim.adamw.AdamW"
    assert canonical_optimizer_name("ADAMW8BIT") == "AdamW8bit"
    assert canonical_optimizer_name("adafactor") == "AdaFactor"
    assert canonical_optimizer_name("Adafactor") == "AdaFactor"
    assert canonical_optimizer_name("something") is None
    assert "Lion" in OPTIMIZER_NAMES and "DAdaptation" in OPTIMIZER_NAMES


def test_adamw8bit_on_cpu_uses_8bit_state():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 16)
    groups = [{"params": list(layer.parameters()), "name": "unet"}]
    opt, ss = build_optimizer("AdamW8bit", groups, 1e-3, {"min_8bit_size": 16})
    assert ss.startswith("bitsandbytes.optim.") and ss.endswith(".AdamW8bit(min_8bit_size=16)")
    before = layer.weight.detach().clone()
    x = torch.randn(4, 16)
    layer(x).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(layer.weight, before)
    assert opt.state[layer.weight]["state1"].dtype == torch.uint8  # really 8-bit


def test_sgd_nesterov_adds_momentum():
    groups = make_groups()
    opt, ss = build_optimizer("SGDNesterov", groups, 1e-2, {})
    assert isinstance(opt, torch.optim.SGD)
    assert ss == "torch.optim.sgd.SGD(momentum=0.9)"
    assert opt.defaults["nesterov"] is True and opt.defaults["momentum"] == 0.9
    assert train_steps(opt, groups) > 0
    _, ss = build_optimizer("sgdnesterov", make_groups(), 1e-2, {"momentum": 0.8, "weight_decay": 0.0})
    assert ss == "torch.optim.sgd.SGD(momentum=0.8,weight_decay=0.0)"


def test_sgd_nesterov_8bit_adds_momentum():
    groups = make_groups()
    opt, ss = build_optimizer("SGDNesterov8bit", groups, 1e-2, {})
    assert ss.endswith(".SGD8bit(momentum=0.9)")
    assert train_steps(opt, groups) > 0


@pytest.mark.parametrize("name,cls", [
    ("DAdaptation", "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint"),
    ("DAdaptAdam", "dadaptation.dadapt_adam.DAdaptAdam"),
    ("DAdaptAdaGrad", "dadaptation.dadapt_adagrad.DAdaptAdaGrad"),
    ("DAdaptAdan", "dadaptation.dadapt_adan.DAdaptAdan"),
    ("DAdaptAdanIP", "dadaptation.experimental.dadapt_adan_ip.DAdaptAdanIP"),
    ("DAdaptLion", "dadaptation.dadapt_lion.DAdaptLion"),
    ("DAdaptSGD", "dadaptation.dadapt_sgd.DAdaptSGD"),
])
def test_dadaptation_family(name, cls):
    groups = make_groups(1.0, 1.0)
    opt, ss = build_optimizer(name, groups, 1.0, {"d0": 1e-3})
    assert ss == f"{cls}(d0=0.001)"
    sched = build_scheduler("constant", opt, 0, 10, 1, 1.0, None)
    assert train_steps(opt, groups, scheduler=sched) > 0
    lrs = current_lrs(opt, sched)
    assert list(lrs) == ["d*lr/textencoder", "textencoder", "d*lr/unet", "unet"]
    assert lrs["textencoder"] == 1.0
    d = opt.param_groups[0]["d"]
    assert lrs["d*lr/textencoder"] == pytest.approx(d * 1.0) and d > 0


def test_prodigy_moves_with_d0():
    groups = make_groups(1.0, 1.0)
    opt, ss = build_optimizer("Prodigy", groups, 1.0, {"d0": 1e-3, "weight_decay": 0.01})
    assert ss == "prodigyopt.prodigy.Prodigy(d0=0.001,weight_decay=0.01)"
    sched = build_scheduler("constant", opt, 0, 10, 1, 1.0, None)
    assert train_steps(opt, groups, steps=5, scheduler=sched) > 1e-4
    lrs = current_lrs(opt, sched)
    assert lrs["d*lr/unet"] == pytest.approx(opt.param_groups[1]["d"] * opt.param_groups[1]["lr"])
    assert next(iter(lrs)) == "d*lr/textencoder"


def test_adafactor_fixed_lr():
    groups = make_groups(1e-2, 1e-2)
    assert not adafactor_uses_relative_step("AdaFactor", {"relative_step": False, "scale_parameter": False})
    opt, ss = build_optimizer("Adafactor", groups, 1e-2,
                              {"relative_step": False, "scale_parameter": False, "warmup_init": False})
    assert ss == ("transformers.optimization.Adafactor"
                  "(relative_step=False,scale_parameter=False,warmup_init=False)")
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-2]
    sched = build_scheduler("constant_with_warmup", opt, 0, 10, 1, 1.0, None)
    assert train_steps(opt, groups, scheduler=sched) > 1e-3
    assert current_lrs(opt, sched) == {"textencoder": 1e-2, "unet": 1e-2}


def test_adafactor_relative_step_strips_lrs_and_forces_its_scheduler():
    assert adafactor_uses_relative_step("adafactor", {})
    assert adafactor_uses_relative_step("AdaFactor", {"relative_step": False, "warmup_init": True})
    assert not adafactor_uses_relative_step("AdamW", {})
    groups = make_groups(1e-4, 1e-3)
    opt, ss = build_optimizer("AdaFactor", groups, 1e-3, {})
    assert ss == "transformers.optimization.Adafactor(relative_step=True)"
    assert opt.defaults["lr"] is None
    assert all(g["lr"] is None for g in opt.param_groups)  # the unet/TE lrs are gone
    sched = build_scheduler("adafactor", opt, 0, 10, 1, 1.0, 1e-3)
    assert list(current_lrs(opt, sched).values()) == [1e-3, 1e-3]  # initial_lr before stepping
    assert train_steps(opt, groups, scheduler=sched) > 0
    after = current_lrs(opt, sched)
    assert set(after) == {"textencoder", "unet"}
    assert all(v > 0 and v != 1e-3 for v in after.values())  # Adafactor's own relative lr
    with pytest.raises(ConfigError):
        build_scheduler("adafactor", opt, 5, 10, 1, 1.0, 1e-3)  # no warmup with this schedule


def test_adafactor_warmup_init_forces_relative_step():
    opt, ss = build_optimizer("AdaFactor", make_groups(), 1e-3, {"relative_step": False, "warmup_init": True})
    assert ss == "transformers.optimization.Adafactor(relative_step=True,warmup_init=True)"
    assert opt.defaults["relative_step"] is True and opt.defaults["lr"] is None


def test_adafactor_scheduler_needs_adafactor():
    opt, _ = build_optimizer("AdamW", make_groups(), 1e-3, {})
    with pytest.raises(ConfigError):
        build_scheduler("adafactor", opt, 0, 10, 1, 1.0, 1e-3)


# --- other names ---------------------------------------------------------------------------------

def test_dotted_and_plain_torch_names():
    groups = make_groups()
    opt, ss = build_optimizer("torch.optim.RMSprop", groups, 1e-3, {"alpha": 0.9})
    assert isinstance(opt, torch.optim.RMSprop)
    assert ss == "torch.optim.rmsprop.RMSprop(alpha=0.9)"
    assert train_steps(opt, groups) > 0
    opt, ss = build_optimizer("Adagrad", make_groups(), 1e-3, {})
    assert ss == "torch.optim.adagrad.Adagrad"


def test_unknown_names_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown optimizer 'NoSuchOptimizer'"):
        build_optimizer("NoSuchOptimizer", make_groups(), 1e-3, {})
    with pytest.raises(ConfigError, match="D-Adaptation"):
        build_optimizer("DAdaptFoo", make_groups(), 1.0, {})
    with pytest.raises(TrainingError, match="not installed"):
        build_optimizer("nosuchpackage_xyz.Opt", make_groups(), 1e-3, {})
    with pytest.raises(ConfigError, match="no class Nope"):
        build_optimizer("torch.optim.Nope", make_groups(), 1e-3, {})


def test_lion_without_lion_pytorch(monkeypatch):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # makes the import fail
    with pytest.raises(TrainingError) as info:
        build_optimizer("Lion", make_groups(), 1e-4, {})
    text = str(info.value)
    assert "pip install lion-pytorch" in text and "Lion8bit" in text


def test_bad_optimizer_argument_is_a_config_error():
    with pytest.raises(ConfigError, match="optimizer_args"):
        build_optimizer("AdamW", make_groups(), 1e-3, {"no_such_arg": 1})


# --- schedules -----------------------------------------------------------------------------------

def lr_curve(name: str, warmup: int, total: int, cycles: int = 1, power: float = 1.0, lr: float = 1.0) -> list[float]:
    opt, _ = build_optimizer("SGDNesterov", make_groups(None, None), lr, {})
    sched = build_scheduler(name, opt, warmup, total, cycles, power, None)
    out = []
    for _ in range(total):
        out.append(current_lrs(opt, sched)["unet"])
        opt.step()
        sched.step()
    return out


def test_constant_with_warmup_ramps_linearly_then_flat():
    curve = lr_curve("constant_with_warmup", 4, 10)
    assert curve == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_warmup_first_step_is_zero_for_every_warmup_schedule():
    for name in ("constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"):
        assert lr_curve(name, 5, 20)[0] == 0.0, name


def test_constant_is_flat_and_rejects_warmup():
    assert lr_curve("constant", 0, 5) == [1.0] * 5
    opt, _ = build_optimizer("AdamW", make_groups(), 1e-3, {})
    with pytest.raises(ConfigError, match="warmup"):
        build_scheduler("constant", opt, 3, 10, 1, 1.0, None)


def test_linear_decays_to_zero():
    curve = lr_curve("linear", 2, 12)
    assert curve[2] == pytest.approx(1.0)
    assert curve[7] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(curve[2:], curve[3:]))


def test_cosine_is_one_half_cosine():
    curve = lr_curve("cosine", 0, 20)
    assert curve[0] == pytest.approx(1.0) and curve[10] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(curve, curve[1:]))


def test_cosine_with_restarts_restarts_num_cycles_times():
    curve = lr_curve("cosine_with_restarts", 0, 20, cycles=2)
    assert curve[0] == pytest.approx(1.0) and curve[10] == pytest.approx(1.0)  # the restart
    assert curve[5] == pytest.approx(0.5) and curve[15] == pytest.approx(0.5)
    assert curve[9] < 0.05
    one_cycle = lr_curve("cosine_with_restarts", 0, 20, cycles=1)
    assert one_cycle[10] == pytest.approx(0.5)


def test_polynomial_power_and_lr_end():
    curve = lr_curve("polynomial", 0, 10, power=2.0)
    lr_end = 1e-7
    # (lr - lr_end) * (1 - t/T)^2 + lr_end, the transformers/diffusers default lr_end
    assert curve[5] == pytest.approx((1 - lr_end) * 0.25 + lr_end)
    opt, _ = build_optimizer("AdamW", make_groups(None, None), 1.0, {})
    sched = build_scheduler("polynomial", opt, 0, 10, 1, 2.0, None)
    for _ in range(10):
        opt.step()
        sched.step()
    assert current_lrs(opt, sched)["unet"] == pytest.approx(lr_end)


def test_group_lrs_are_reported_per_group():
    opt, _ = build_optimizer("AdamW", make_groups(1e-4, 1e-3), 5e-4, {})
    sched = build_scheduler("constant", opt, 0, 10, 1, 1.0, None)
    assert current_lrs(opt, sched) == {"textencoder": 1e-4, "unet": 1e-3}
    unnamed = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    opt, _ = build_optimizer("AdamW", unnamed, 5e-4, {})
    assert current_lrs(opt, None) == {"group0": 5e-4}


def test_unknown_scheduler():
    opt, _ = build_optimizer("AdamW", make_groups(), 1e-3, {})
    with pytest.raises(ConfigError, match="unknown scheduler"):
        build_scheduler("warmup_stable_decay_x", opt, 0, 10, 1, 1.0, None)

