"""Step/epoch arithmetic, warmup, save points, pruning and file names
against the sd-scripts reference (sd-scripts-behaviour.md §3, §5, §8.1, §8.2)."""

from __future__ import annotations

import pytest

from loracli.buckets import count_batches
from loracli.schedule import (
    Schedule,
    compute_schedule,
    epoch_file_name,
    epoch_of_step,
    epoch_save_points,
    final_file_name,
    kept_after_pruning,
    resolve_warmup_steps,
    sample_points,
    step_file_name,
    step_save_points,
)


# --- §3 worked example 1: 36 images in 1_subj, batch 6, GA 1, 1 GPU, one bucket

def test_example_1_max_train_epochs():
    s = compute_schedule(6, 1, 1, 230, None)
    assert s == Schedule(batches_per_epoch=6, batches_per_process=6, steps_per_epoch=6,
                         total_steps=1380, epochs=230, formula=s.formula)
    assert s.formula == "230 epochs × ceil(ceil(6 batches / 1 process) / 1 GA) = 1380 steps"


def test_example_1_without_epochs_1600_steps():
    s = compute_schedule(6, 1, 1, None, 1600)
    assert (s.total_steps, s.steps_per_epoch, s.epochs) == (1600, 6, 267)
    # Stops inside epoch 267: 266 full epochs are 1596 steps, plus 4.
    assert 1600 - (s.epochs - 1) * s.steps_per_epoch == 4
    assert epoch_of_step(1600, 6) == 267
    assert "267 epochs" in s.formula and "1600" in s.formula


def test_max_train_epochs_wins_over_max_train_steps():
    s = compute_schedule(6, 1, 1, 230, 1600)
    assert (s.total_steps, s.epochs) == (1380, 230)


def test_example_1_split_into_three_buckets():
    batches = count_batches({(512, 512): 20, (640, 384): 10, (384, 640): 6}, 6)
    assert sum(batches.values()) == 4 + 2 + 1 == 7
    s = compute_schedule(sum(batches.values()), 1, 1, 230, None)
    assert (s.steps_per_epoch, s.total_steps) == (7, 1610)


@pytest.mark.parametrize("n, procs, ga, epochs, steps, expected", [
    # 7 batches on 2 GPUs: 4 per process; GA 2 -> 2 updates/epoch; sd-scripts: 10*ceil(7/2/2) = 20
    (7, 2, 2, 10, None, (4, 2, 20, 10)),
    # GA 4 over 7 batches: updates after 4 and after the last 3 -> 2 per epoch
    (7, 1, 4, 3, None, (7, 2, 6, 3)),
    # 13 batches, 3 GPUs: 5 per process, GA 2: 3 updates; 100 steps -> ceil(100/3) = 34 epochs
    (13, 3, 2, None, 100, (5, 3, 100, 34)),
    # a run shorter than one epoch still has 1 epoch
    (50, 1, 1, None, 10, (50, 50, 10, 1)),
])
def test_processes_and_accumulation(n, procs, ga, epochs, steps, expected):
    s = compute_schedule(n, procs, ga, epochs, steps)
    assert (s.batches_per_process, s.steps_per_epoch, s.total_steps, s.epochs) == expected
    assert s.batches_per_epoch == n


def test_formula_pluralises():
    s = compute_schedule(13, 3, 2, 1, None)
    assert s.formula == "1 epoch × ceil(ceil(13 batches / 3 processes) / 2 GA) = 3 steps"


def test_neither_epochs_nor_steps_is_an_error():
    with pytest.raises(ValueError, match="max_train_epochs"):
        compute_schedule(6, 1, 1, None, None)


@pytest.mark.parametrize("args", [(0, 1, 1, 1, None), (6, 0, 1, 1, None), (6, 1, 0, 1, None),
                                  (6, 1, 1, 0, None), (6, 1, 1, None, 0)])
def test_non_positive_inputs_are_rejected(args):
    with pytest.raises(ValueError):
        compute_schedule(*args)


def test_epoch_of_step():
    assert [epoch_of_step(s, 6) for s in (1, 6, 7, 12, 13)] == [1, 1, 2, 2, 3]
    with pytest.raises(ValueError):
        epoch_of_step(0, 6)


# --- §5 warmup

@pytest.mark.parametrize("value, total, procs, expected", [
    (10, 1000, 1, 10),
    (10, 1000, 2, 10),  # an int is never scaled by processes
    (0, 1000, 1, 0),
    (0.0, 1000, 1, 0),
    (0.1, 1000, 2, 200),  # ratio of max_train_steps * num_processes
    (0.05, 1380, 1, 69),
    (0.05, 1600, 4, 320),
    (0.29, 100, 1, 28),  # 0.29 * 100 = 28.999999999999996 in float; int() truncates, as sd-scripts
])
def test_warmup(value, total, procs, expected):
    assert resolve_warmup_steps(value, total, procs) == expected


@pytest.mark.parametrize("value", [1.0, 1.5, -1, -0.1, True])
def test_warmup_rejects_bad_values(value):
    with pytest.raises(ValueError):
        resolve_warmup_steps(value, 1000, 1)


# --- §8.2 save points

def test_epoch_save_points_skip_the_last_epoch():
    assert epoch_save_points(2, 10) == [2, 4, 6, 8]  # 10 is the final file
    assert epoch_save_points(3, 10) == [3, 6, 9]
    assert epoch_save_points(1, 3) == [1, 2]
    assert epoch_save_points(5, 5) == []
    assert epoch_save_points(None, 10) == []


def test_step_save_points_include_the_last_step():
    assert step_save_points(100, 500) == [100, 200, 300, 400, 500]
    assert step_save_points(100, 450) == [100, 200, 300, 400]
    assert step_save_points(None, 500) == []


@pytest.mark.parametrize("points, n, k, expected", [
    # n=2, k=2, 10 epochs: save 2 (2-4<0: none), 4 (deletes 0: no such file),
    # 6 (deletes 2), 8 (deletes 4) -> 6, 8 remain.
    ([2, 4, 6, 8], 2, 2, [6, 8]),
    # n=3, k=1: 6 deletes 3, 9 deletes 6 -> only 9.
    ([3, 6, 9], 3, 1, [9]),
    # n=1, k=3, 7 epochs saved 1..6: e deletes e-3 -> 4, 5, 6 remain.
    ([1, 2, 3, 4, 5, 6], 1, 3, [4, 5, 6]),
    # k larger than the run: nothing deleted.
    ([1, 2, 3], 1, 5, [1, 2, 3]),
    # no save_last_n_epochs: nothing deleted.
    ([2, 4, 6], 2, None, [2, 4, 6]),
])
def test_epoch_pruning(points, n, k, expected):
    assert kept_after_pruning(points, n, k, "epoch") == expected


@pytest.mark.parametrize("points, n, k, expected", [
    # n=100, k=250, steps 100..1000: at step s delete floor((s-251)/100)*100.
    # 100 -> -200, 200 -> -100 (none); 300 -> 0 (no file); 400 -> 100; ... 1000 -> 700.
    # Files from the last 250 steps stay: 800, 900, 1000.
    (list(range(100, 1001, 100)), 100, 250, [800, 900, 1000]),
    # sd-scripts' own comment case: n=10, k=30. At 50: 50-31=19 -> 10 deleted; 20..50 stay.
    ([10, 20, 30, 40, 50], 10, 30, [20, 30, 40, 50]),
    # n=10, k=30 up to 80: 60 deletes 20 (29->20), 70 deletes 30, 80 deletes 40 (49->40).
    ([10, 20, 30, 40, 50, 60, 70, 80], 10, 30, [50, 60, 70, 80]),
    # k=10 with n=10: s deletes floor((s-11)/10)*10 = s-20 -> the last two files stay.
    ([10, 20, 30, 40], 10, 10, [30, 40]),
    # k=5 < n=10: s deletes floor((s-6)/10)*10 = s-10 -> one file stays.
    ([10, 20, 30], 10, 5, [30]),
])
def test_step_pruning(points, n, k, expected):
    assert kept_after_pruning(points, n, k, "step") == expected


def test_pruning_replays_on_partial_history():
    # The trainer passes the files it still has; replaying must agree with the full replay.
    full = kept_after_pruning([2, 4, 6, 8], 2, 2, "epoch")
    assert kept_after_pruning([6, 8], 2, 2, "epoch") == full
    assert kept_after_pruning([4, 6, 8], 2, 2, "epoch") == full


def test_pruning_kind_is_checked():
    with pytest.raises(ValueError):
        kept_after_pruning([1], 1, 1, "epochs")  # type: ignore[arg-type]


# --- §8.1 file names

def test_file_names_with_output_name():
    assert epoch_file_name("mylora", 4) == "mylora-000004.safetensors"
    assert step_file_name("mylora", 100) == "mylora-step00000100.safetensors"
    assert final_file_name("mylora") == "mylora.safetensors"


def test_file_names_without_output_name():
    assert epoch_file_name(None, 4) == "epoch-000004.safetensors"
    assert step_file_name(None, 100) == "at-step00000100.safetensors"
    assert final_file_name(None) == "last.safetensors"


def test_file_names_other_extensions():
    assert epoch_file_name("x", 12, "ckpt") == "x-000012.ckpt"
    assert step_file_name("x", 5, ".pt") == "x-step00000005.pt"
    assert final_file_name(None, "pt") == "last.pt"


# --- sampling

def test_sample_every_n_steps():
    p = sample_points(100, None, 450, 60, 8)
    assert p["steps"] == [100, 200, 300, 400]
    assert p["epochs"] == [] and p["at_first"] is False


def test_sample_every_n_epochs_includes_last_and_ignores_steps():
    # 1600 steps at 6 per epoch = 267 epochs; every 89 epochs -> 89, 178, 267 (the last).
    p = sample_points(100, 89, 1600, 6, 267, sample_at_first=True)
    assert p["epochs"] == [89, 178, 267]
    assert p["epoch_end_steps"] == [534, 1068, 1600]  # the last epoch ends early, at 1600
    assert p["steps"] == []  # sd-scripts ignores sample_every_n_steps when epochs are set
    assert p["at_first"] is True


def test_no_sampling():
    assert sample_points(None, None, 100, 10, 10) == {"at_first": False, "steps": [], "epochs": [],
                                                      "epoch_end_steps": []}
