"""A newcomer's first hour, run side: what a user sees and gets from `loracli train` (issue 13)."""

from __future__ import annotations

import torch

from loracli.run.optim import build_optimizer


def test_adaptive_optimizers_print_nothing_when_built(capsys):
    for name in ("Prodigy", "DAdaptAdam"):
        param = torch.nn.Parameter(torch.zeros(2))
        optimizer, _ = build_optimizer(name, [{"params": [param], "lr": 1.0}], 1.0,
                                       {"decouple": True, "weight_decay": 0.01})
        assert optimizer.param_groups[0]["decouple"] is True  # the argument still arrived
    captured = capsys.readouterr()
    assert "decoupled" not in captured.out + captured.err
