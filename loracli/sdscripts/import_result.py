"""What an import produced: loracli values by section, and an account of every input key.

Every key of the input ends in exactly one of three lists: mapped (to which
loracli key), not imported (with the reason), or empty (the input leaves it
unset, so there is nothing to carry over). The importers fill an
`ImportResult`; `loracli.sdscripts.importer` renders it as TOML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from loracli.config.loader import PATH_KEYS
from loracli.config.schema import SECTIONS

SECTION_ORDER = tuple(SECTIONS)  # model, dataset, network, optimizer, training, output, sample, logging


@dataclass
class ImportResult:
    source: Path
    kind: str  # "sd-scripts config TOML", "kohya_ss GUI JSON", "shell script", ...
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    mapped: dict[str, list[str]] = field(default_factory=dict)  # input key -> loracli dotted keys
    unsupported: dict[str, str] = field(default_factory=dict)  # input key -> why it was not imported
    empty: list[str] = field(default_factory=list)  # input keys left unset in the input
    notes: list[str] = field(default_factory=list)  # value changes worth knowing (defaults, conversions)

    def set(self, dotted: str, value: Any, from_key: str) -> bool:
        """Store a value for a loracli key, converted to its schema type; a bad value is reported instead."""
        try:
            converted = coerce(dotted, value)
        except (ValueError, TypeError) as exc:
            self.skip(from_key, f"{value!r} is not a valid {dotted}: {exc}")
            return False
        section, key = dotted.split(".", 1)
        self.values.setdefault(section, {})[key] = converted
        targets = self.mapped.setdefault(from_key, [])
        if dotted not in targets:
            targets.append(dotted)
        self.unsupported.pop(from_key, None)
        if from_key in self.empty:
            self.empty.remove(from_key)
        return True

    def get(self, dotted: str) -> Any:
        section, key = dotted.split(".", 1)
        return self.values.get(section, {}).get(key)

    def has(self, dotted: str) -> bool:
        section, key = dotted.split(".", 1)
        return key in self.values.get(section, {})

    def drop(self, dotted: str) -> None:
        section, key = dotted.split(".", 1)
        self.values.get(section, {}).pop(key, None)

    def skip(self, from_key: str, reason: str) -> None:
        if from_key not in self.mapped:
            self.unsupported[from_key] = reason

    def unset(self, from_key: str) -> None:
        if from_key not in self.mapped and from_key not in self.unsupported and from_key not in self.empty:
            self.empty.append(from_key)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def ordered_values(self) -> dict[str, Any]:
        out: dict[str, Any] = {s: dict(self.values[s]) for s in SECTION_ORDER if self.values.get(s)}
        if self.values.get("datasets"):  # [[datasets]] (a dataset config), after the sections
            out["datasets"] = self.values["datasets"]
        return out


def _field(dotted: str):
    section, key = dotted.split(".", 1)
    model = SECTIONS.get(section)
    if model is None or key not in model.model_fields:
        raise ValueError(f"loracli has no key {dotted}")
    return model.model_fields[key]


def parse_resolution(value: Any) -> int | list[int]:
    """sd-scripts writes "512" or "W,H" on the command line, an int or [W, H] in TOML."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts:
            raise ValueError("empty resolution")
        value = [int(float(p)) for p in parts]
    if isinstance(value, (list, tuple)):
        sides = [int(v) for v in value]
        if len(sides) == 1 or (len(sides) == 2 and sides[0] == sides[1]):
            return sides[0]
        if len(sides) != 2:
            raise ValueError("expected one size or W,H")
        return sides
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("expected a size or W,H")
    return int(value)


def coerce(dotted: str, value: Any) -> Any:
    """A value from sd-scripts (often text) as the TOML value loracli's schema expects.

    Paths stay exactly as given (text); everything else goes through the field's
    type in pydantic's lax mode ("512" -> 512, "True" -> true), then back to
    plain TOML-able values.
    """
    field_info = _field(dotted)
    if dotted == "dataset.resolution":
        return parse_resolution(value)
    if dotted in PATH_KEYS:
        if not isinstance(value, str) or not value.strip():
            raise ValueError("expected a path")
        return value
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float) and value.is_integer() and _wants_int(field_info.annotation):
        value = int(value)  # kohya_ss JSON writes 64.0 for ints
    try:
        adapter = TypeAdapter(field_info.annotation)
        parsed = adapter.validate_python(value)
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"]) from None
    return adapter.dump_python(parsed, mode="json")


def _wants_int(annotation: Any) -> bool:
    text = str(annotation)
    return annotation is int or ("int" in text and "float" not in text)
