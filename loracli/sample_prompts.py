"""sd-scripts' sample prompt files: one prompt per line, `#` comments, per-line options.

    masterpiece, 1girl, smiling --n lowres, bad hands --w 512 --h 768 --d 42 --l 7 --s 28

Options follow the prompt, each introduced by " --": --n negative prompt, --w width,
--h height, --d seed, --l CFG scale, --s sampling steps. Defaults are sd-scripts'
(512x512, scale 7.5, 30 steps); width and height are floored to a multiple of 8
(at least 64) as sd-scripts does. Pure Python: the plan reads these too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loracli.errors import DatasetError, Problem

KEY = "sample.sample_prompts"
OPTIONS = {"n": "negative prompt", "w": "width", "h": "height", "d": "seed", "l": "CFG scale", "s": "steps"}


@dataclass(frozen=True)
class SamplePrompt:
    index: int  # 0-based position among the file's prompts (the _NN in image names)
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    scale: float = 7.5
    steps: int = 30
    line: int = 0  # 1-based line in the file, for messages
    unknown_options: tuple[str, ...] = ()


def parse_prompt_line(text: str, index: int, line: int = 0, where: str = KEY) -> SamplePrompt:
    parts = text.split(" --")
    values: dict[str, object] = {}
    unknown: list[str] = []
    for part in parts[1:]:
        name, _, value = part.strip().partition(" ")
        value = value.strip()
        if name not in OPTIONS:
            unknown.append(f"--{name}")
            continue
        try:
            values[name] = _convert(name, value)
        except ValueError:
            raise DatasetError(Problem(f"{where}, line {line}", f"--{name} {value!r} is not a valid {OPTIONS[name]}",
                                       "e.g. --w 512 --h 768 --d 42 --l 7.5 --s 28 --n lowres")) from None
    return SamplePrompt(
        index=index, prompt=parts[0].strip(), negative_prompt=str(values.get("n", "")),
        width=_floor8(values.get("w", 512)), height=_floor8(values.get("h", 512)),
        seed=values.get("d"), scale=float(values.get("l", 7.5)),  # type: ignore[arg-type]
        steps=values.get("s", 30), line=line, unknown_options=tuple(unknown),  # type: ignore[arg-type]
    )


def _convert(name: str, value: str) -> object:
    if name == "n":
        return value
    if name == "l":
        return float(value)
    number = int(value)
    if name == "s":
        return max(1, min(1000, number))  # sd-scripts clamps the steps
    if number < 0 or (name in "wh" and number == 0):
        raise ValueError(value)
    return number


def _floor8(size: object) -> int:
    return max(64, int(size) - int(size) % 8)  # type: ignore[call-overload]


def read_prompt_file(path: Path) -> list[SamplePrompt]:
    """All prompts of a .txt prompt file (sd-scripts' .toml/.json prompt files are not read)."""
    where = f"{KEY}: {path}"
    if path.suffix.lower() in (".toml", ".json"):
        raise DatasetError(Problem(where, f"{path.suffix} prompt files are not supported",
                                   "write one prompt per line in a .txt file, options as --n/--w/--h/--d/--l/--s"))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(Problem(where, "prompt file not found", "check the path")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(Problem(where, f"cannot read the prompt file ({exc})", "save it as UTF-8 text")) from None
    prompts: list[SamplePrompt] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped and not stripped.startswith("#"):
            prompts.append(parse_prompt_line(stripped, len(prompts), number, where))
    return prompts


def image_stem(output_name: str | None, label: str, prompt: SamplePrompt) -> str:
    """sd-scripts' sample image names without the timestamp: [name_]<e000002|000010>_<NN>[_seed]."""
    prefix = f"{output_name}_" if output_name else ""
    seed = "" if prompt.seed is None else f"_{prompt.seed}"
    return f"{prefix}{label}_{prompt.index:02d}{seed}"


def round_label(step: int, epoch: int | None) -> str:
    """e000002 after an epoch (e000000 before training), 000010 after a step, as sd-scripts names them."""
    return f"e{epoch:06d}" if epoch is not None else f"{step:06d}"


def round_title(label: str) -> str:
    if label == "e000000":
        return "before training"
    return f"epoch {int(label[1:])}" if label.startswith("e") else f"step {int(label)}"
