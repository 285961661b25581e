"""Read a .safetensors file's header and a few small tensors without torch.

The format: 8 bytes little-endian header length N, N bytes of JSON ({"__metadata__":
{str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}), then the data;
offsets count from the first byte after the header. Only what `loracli inspect` needs:
the header, and scalars (alphas) read by offset, so a 200 MB LoRA is inspected in
milliseconds.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from loracli.errors import DatasetError, Problem

# A header larger than this is not a LoRA's (sd-scripts' safety limit for headers is 100 MB too).
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_STRUCT = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B",
           "U16": "<H", "U32": "<I", "U64": "<Q", "BOOL": "<?"}
HINT = "check the path; a file still being written or cut short by a full disk looks like this"


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    file_size: int
    data_start: int  # absolute offset of the data section
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def _broken(path: Path, message: str) -> DatasetError:
    return DatasetError(Problem(str(path), message, HINT))


def read_header(path: Path) -> SafetensorsHeader:
    """The header of `path`; DatasetError (exit 3) when it is missing or not a whole safetensors file."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(Problem(str(path), "no such file", "check the path"))
    if not path.is_file():
        raise DatasetError(Problem(str(path), "not a file", "give a .safetensors file"))
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _broken(path, f"not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise _broken(path, "not a safetensors file (its first 8 bytes are not a plausible header length)")
            if 8 + length > size:
                raise _broken(path, f"truncated header: it announces {length} bytes, the file has {size - 8} after "
                                    "the length")
            raw = f.read(length)
    except OSError as exc:  # unreadable (permissions, I/O error): one line naming the file
        raise DatasetError(Problem(str(path), f"cannot read the file ({exc.strerror or type(exc).__name__})",
                                   "check its permissions and the disk")) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _broken(path, "not a safetensors file (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise _broken(path, "not a safetensors file (the header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _broken(path, "invalid safetensors header (__metadata__ is not an object)")
    data_start = 8 + length
    tensors: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            tensor = TensorEntry(name, str(entry["dtype"]), tuple(int(d) for d in entry["shape"]), begin, end)
        except (KeyError, TypeError, ValueError):
            raise _broken(path, f"invalid safetensors header (entry {name!r} lacks dtype/shape/data_offsets)") from None
        if data_start + end > size:
            raise _broken(path, f"truncated file: tensor {name!r} ends at byte {data_start + end}, the file has "
                                f"{size}")
        tensors[name] = tensor
    return SafetensorsHeader(path, size, data_start, tensors,
                             {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})


def decode_scalar(dtype: str, raw: bytes) -> float | None:
    """One element of a tensor as a Python float; None for dtypes we do not decode (fp8)."""
    if dtype == "BF16":
        # bfloat16 is the upper half of a float32
        return struct.unpack("<f", b"\x00\x00" + raw[:2])[0]
    fmt = _STRUCT.get(dtype)
    if fmt is None:
        return None
    return float(struct.unpack(fmt, raw[:struct.calcsize(fmt)])[0])


def read_scalars(header: SafetensorsHeader, names: list[str]) -> dict[str, float | None]:
    """The first element of each named tensor (alphas are 0-d), read by offset."""
    out: dict[str, float | None] = {}
    with header.path.open("rb") as f:
        for name in names:
            entry = header.tensors[name]
            width = DTYPE_BYTES.get(entry.dtype, 0)
            if width == 0 or entry.end - entry.begin < width:
                out[name] = None
                continue
            f.seek(header.data_start + entry.begin)
            out[name] = decode_scalar(entry.dtype, f.read(width))
    return out
