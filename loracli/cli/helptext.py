"""How `--help` reads in an 80-column terminal: examples that paste, placeholders a person reads.

click re-wraps an epilog like prose, which cuts an example mid-token (`--output-` / `dir runs`) and
leaves a multi-line example without line continuations; Typer names a repeatable option's value
`<list[str]>` and a bounded number `<int range>`. Both are fixed here once for every command:
an "Examples:" epilog is laid out as shell commands (split between words, with ` \\` continuations),
and the placeholders name what one value is (`<str>`, `<int>`; the range is already in the help).
"""

from __future__ import annotations

import re

import click
import typer.core

EXAMPLES = "Examples:"
INDENT = "  "
CONTINUATION_INDENT = "      "
_TOKEN = re.compile(r"""(?:'[^']*'|"[^"]*"|\S)+""")  # a shell word, quotes kept whole


def wrap_command(command: str, width: int) -> list[str]:
    """One example command as lines of at most `width` columns where its words allow, split between
    words (never inside a quoted word) and continued with ` \\` so the lines paste as one command."""
    words = _units(_TOKEN.findall(command))
    lines: list[str] = []
    current = INDENT
    for word in words:
        lead = INDENT if not lines else CONTINUATION_INDENT
        candidate = f"{current} {word}" if current.strip() else current + word
        if current.strip() and len(candidate) + 2 > width:  # room for the " \" of a continuation
            lines.append(current + " \\")
            current = CONTINUATION_INDENT + word
            continue
        current = candidate if current.strip() else lead + word
    lines.append(current)
    return lines


def _units(words: list[str]) -> list[str]:
    """An option stays on the line of its value (`-o ab.safetensors`), where that fits."""
    units: list[str] = []
    for word in words:
        if units and units[-1].startswith("-") and " " not in units[-1] and not word.startswith("-") \
                and word not in ("&&", "|", ">"):
            units[-1] += " " + word
        else:
            units.append(word)
    return units


def examples_text(epilog: str, width: int) -> list[str]:
    """The lines of an "Examples:" epilog: each blank-line-separated paragraph is one command."""
    body = epilog.split(EXAMPLES, 1)[1]
    out = [EXAMPLES]
    for paragraph in [p for p in body.split("\n\n") if p.strip()]:
        out.append("")
        out.extend(wrap_command(" ".join(paragraph.split()), width))
    return out


def _format_epilog(self: click.Command, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    epilog = self.epilog or ""
    if not epilog.lstrip().startswith(EXAMPLES):
        return _click_format_epilog(self, ctx, formatter)
    formatter.write_paragraph()
    width = (formatter.width or 80) - formatter.current_indent
    for line in examples_text(epilog.strip(), width):
        formatter.write(" " * formatter.current_indent + line + "\n" if line else "\n")


def _display_type(self, ctx: click.Context) -> str:
    label = _typer_display_type(self, ctx)
    label = re.sub(r"^<list\[(.+)\]>$", r"<\1>", label)  # one value: the option repeats (and says so)
    return re.sub(r"^<(\w+) range>$", r"<\1>", label)  # the bounds are printed in [brackets]


_click_format_epilog = click.Command.format_epilog
_typer_display_type = typer.core._TyperParameter.display_type


def install() -> None:
    """Called once by loracli.cli.app: every loracli command's help gets this layout."""
    typer.core.TyperCommand.format_epilog = _format_epilog  # type: ignore[method-assign]
    typer.core.TyperGroup.format_epilog = _format_epilog  # type: ignore[method-assign]
    typer.core._TyperParameter.display_type = _display_type  # type: ignore[method-assign]
