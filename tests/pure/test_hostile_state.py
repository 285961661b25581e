"""Resume picks the newest whole state: a state whose train_state.json was damaged after it was completed
is passed over for the one before; with none left, one line says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loracli.errors import TrainingError
from loracli.run.state import MARKER, load_latest_state


class Recorder:
    def __init__(self) -> None:
        self.loaded: list[str] = []

    def load_state(self, path: str) -> None:
        self.loaded.append(Path(path).name)


def state(run: Path, step: int, text: str | None) -> None:
    folder = run / "state" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    if text is not None:
        (folder / "train_state.json").write_text(text)
    (folder / MARKER).write_text("ok\n")


GOOD = json.dumps({"global_step": 4, "epoch": 2, "batches_done": 1, "loader_rng": [3, [1, 2], None]})


@pytest.mark.parametrize("damage", ['{"global_step": 8, "ep', "[]", '{"global_step": "8", "epoch": 1, '
                                    '"batches_done": 0, "loader_rng": []}', None, "\xff"])
def test_a_damaged_newest_state_falls_back_to_the_one_before(tmp_path, damage):
    state(tmp_path, 4, GOOD)
    state(tmp_path, 8, damage)
    accelerator = Recorder()
    position = load_latest_state(accelerator, tmp_path)
    assert position is not None and position.global_step == 4
    assert accelerator.loaded == ["step-00000004"]  # the damaged one's weights are never loaded


def test_every_state_damaged_is_one_line(tmp_path):
    state(tmp_path, 4, "{")
    state(tmp_path, 8, "{")
    with pytest.raises(TrainingError) as caught:
        load_latest_state(Recorder(), tmp_path)
    (problem,) = caught.value.problems
    assert "step-00000008" in problem.where and "every older state" in problem.message
