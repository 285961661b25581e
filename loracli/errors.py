"""The project's error types. Library code raises these; only the CLI maps them
to exit codes and one-line messages (never a traceback)."""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_CONFIG = 2  # config or usage error
EXIT_DATASET = 3  # dataset or input-file error
EXIT_TRAINING = 4  # training failed at run time
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM: state saved, resumable


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input.

    where: the file and/or dotted key it concerns (e.g. "my.toml: optimizer.lr").
    origin: where the value came from (default, preset NAME, file, --set), if known.
    """

    where: str
    message: str
    hint: str = ""
    origin: str = ""

    def render(self) -> str:
        text = f"{self.where}: {self.message}"
        if self.origin:
            text += f" (value from {self.origin})"
        if self.hint:
            text += f"; {self.hint}"
        return text


class LoracliError(Exception):
    """Base error: carries one or more problems and the exit code to use."""

    exit_code = EXIT_CONFIG

    def __init__(self, problems: list[Problem] | Problem | str):
        if isinstance(problems, str):
            problems = [Problem("loracli", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(p.render() for p in self.problems))


class ConfigError(LoracliError):
    exit_code = EXIT_CONFIG


class DatasetError(LoracliError):
    exit_code = EXIT_DATASET


class TrainingError(LoracliError):
    exit_code = EXIT_TRAINING


class Interrupted(LoracliError):
    """SIGINT/SIGTERM: the state was saved and the run can be resumed."""

    exit_code = EXIT_INTERRUPTED
