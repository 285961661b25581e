"""What every tool shares: the output-path rule, the device, progress, and a streaming
safetensors writer (a checkpoint is written tensor by tensor, never held whole)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from loracli.errors import ConfigError, DatasetError, Problem

SAVE_PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPE_NAMES.update({torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"})


def check_output(path: Path, force: bool, inputs: Iterable[Path] = ()) -> Path:
    """The output must be a .safetensors path that is not one of the inputs; an existing
    file needs --force. Checked before any work, so a refusal writes nothing."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(Problem(f"output {path}", "the output must be a .safetensors file",
                                  f"e.g. {path.with_suffix('.safetensors').name}"))
    if path.is_dir():
        raise ConfigError(Problem(f"output {path}", "is a folder", "give a file name ending in .safetensors"))
    for source in inputs:
        try:
            same = path.exists() and Path(source).exists() and os.path.samefile(path, source)
        except OSError:
            same = False
        if same or path.absolute() == Path(source).absolute():
            raise ConfigError(Problem(f"output {path}", "is also an input", "write to another file"))
    if path.exists() and not force:
        raise ConfigError(Problem(f"output {path}", "already exists", "add --force to overwrite it"))
    return path


def save_dtype(precision: str | None) -> torch.dtype | None:
    if precision is None:
        return None
    if precision not in SAVE_PRECISIONS:
        raise ConfigError(Problem("--save-precision", f"unknown precision {precision!r}", "use float, fp16 or bf16"))
    return SAVE_PRECISIONS[precision]


def resolve_device(device: str | None) -> torch.device:
    """cpu, cuda or cuda:N; the default is cuda when there is one."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ConfigError(Problem("--device", f"unknown device {device!r}", "use cpu or cuda")) from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(Problem("--device", "cuda was asked for but torch sees no CUDA device",
                                  "use --device cpu, or install the CUDA build of torch"))
    if chosen.type not in ("cpu", "cuda"):
        raise ConfigError(Problem("--device", f"unsupported device {device!r}", "use cpu or cuda"))
    return chosen


@contextmanager
def progress(label: str, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr; yields the function that advances it by one."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise DatasetError(Problem("checkpoint", f"tensors of dtype {dtype} cannot be written",
                                   "convert the model to fp16/fp32 first")) from None


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        return flat.numpy().tobytes()
    # view as bytes: works for bf16/fp8, which numpy cannot hold
    return flat.view(torch.uint8).numpy().tobytes()


def stream_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                       produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None,
                       on_tensor: Callable[[], None] | None = None) -> None:
    """Write a safetensors file whose header is known up front (name, dtype, shape of each
    tensor) and whose tensors are produced one at a time, in `entries` order, by `produce`.

    Written under a hidden temp name in the target's folder and renamed over `path` at the
    end, so an interruption leaves no partial file where a UI would load it.
    """
    from loracli.run.saving import _discard, _fsync_dir, temp_path_for

    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in entries:
        size = torch.empty((), dtype=dtype).element_size()
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name, dtype, shape in entries:
                tensor = produce(name)
                if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise RuntimeError(f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                                       f"announced {dtype} {tuple(shape)}")
                f.write(_tensor_bytes(tensor))
                if on_tensor:
                    on_tensor()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    _fsync_dir(path.parent)
