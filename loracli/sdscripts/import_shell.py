"""A shell script (bash, PowerShell or cmd) holding an sd-scripts command line -> its arguments.

Guides share training scripts like this:

    local image_dir="$TRAIN_DIR/SETS/$training_set/"
    accelerate launch --num_cpu_threads_per_process 8 train_network.py \\
      --train_data_dir="$image_dir" --network_args "conv_dim=8" "algo=locon" ...

This module joins continued lines (`\\`, `^`, backtick), evaluates simple
variable assignments (`NAME=value`, `local`/`export`, PowerShell `$name =
value`, cmd `set NAME=value`) so `$image_dir`, `${x}` and `%X%` expand, and
splits the `train_network.py` line into options. It never runs the script.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from loracli.sdscripts.options import load_option_table

SCRIPT_RE = re.compile(r"(?:^|[\\/\s\"'])((?:sdxl_)?train_network\.py)\b")
BASH_ASSIGN = re.compile(r"^(?:export\s+|local\s+|declare\s+(?:-\w+\s+)*|readonly\s+)?([A-Za-z_]\w*)=(.*)$")
PS_ASSIGN = re.compile(r"^\$([A-Za-z_]\w*)\s*=\s*(.*)$")
CMD_ASSIGN = re.compile(r"^set\s+\"?([A-Za-z_]\w*)=(.*?)\"?\s*$", re.IGNORECASE)
BASH_VAR = re.compile(r"\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)")
CMD_VAR = re.compile(r"%([A-Za-z_]\w*)%")
SHELL_STOP = {";", "&&", "||", "|", "&"}


@dataclass
class ShellCommand:
    style: str  # bash | powershell | cmd
    script: str  # train_network.py or sdxl_train_network.py
    launcher: list[str]  # tokens before the script (accelerate launch ... / python)
    args: dict[str, Any]  # option -> True (flag) | text | list of text
    unresolved: dict[str, str] = field(default_factory=dict)  # option -> the variable it could not expand
    stray: list[str] = field(default_factory=list)  # tokens that belong to no option


def detect_style(text: str) -> str:
    lines = [ln.rstrip() for ln in text.splitlines()]
    if any(ln.endswith("`") for ln in lines) or any(PS_ASSIGN.match(ln.strip()) for ln in lines):
        return "powershell"
    if any(ln.endswith("^") for ln in lines) or any(CMD_ASSIGN.match(ln.strip()) for ln in lines):
        return "cmd"
    return "bash"


def logical_lines(text: str, style: str) -> list[str]:
    """Lines with their continuations joined."""
    mark = {"bash": "\\", "powershell": "`", "cmd": "^"}[style]
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith(mark):
            pending += line[: -len(mark)] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


def _strip_comment(value: str, style: str) -> str:
    if style == "cmd":
        return value
    quote = ""
    for i, ch in enumerate(value):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or value[i - 1].isspace()):
            return value[:i].rstrip()
    return value.strip()


class Variables:
    """Shell variables set by simple assignments; an expression makes a name unknown."""

    def __init__(self, style: str):
        self.style = style
        self.known: dict[str, str] = {}
        self.unknown: set[str] = set()

    def _key(self, name: str) -> str:
        return name.lower() if self.style != "bash" else name

    def assign(self, name: str, raw: str) -> None:
        raw = _strip_comment(raw, self.style)
        try:
            tokens = _split(self.expand(raw)[0], self.style)
        except ValueError:
            tokens = []
        key = self._key(name)
        if len(tokens) == 1 and not self.expand(raw)[1]:
            self.known[key] = tokens[0]
            self.unknown.discard(key)
        elif not tokens and raw.strip() in ("", '""', "''"):
            self.known[key] = ""
            self.unknown.discard(key)
        else:  # an expression, a command substitution, an array: not evaluated
            self.known.pop(key, None)
            self.unknown.add(key)

    def expand(self, text: str) -> tuple[str, list[str]]:
        """Text with known variables substituted, and the names that could not be."""
        missing: list[str] = []

        def sub(match: re.Match[str]) -> str:
            name = next(g for g in match.groups() if g)
            key = self._key(name)
            if key in self.known:
                return self.known[key]
            missing.append(name)
            return match.group(0)

        if self.style == "cmd":
            text = CMD_VAR.sub(sub, text)
        else:
            # single-quoted text is literal in bash and PowerShell
            parts = re.split(r"('[^']*')", text)
            text = "".join(p if p.startswith("'") and p.endswith("'") and len(p) > 1 else BASH_VAR.sub(sub, p)
                           for p in parts)
        return text, missing


def _split(text: str, style: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#" if style != "cmd" else ""
    if style != "bash":
        lexer.escape = ""  # Windows paths: a backslash is a path separator
    return list(lexer)


def find_command(text: str) -> ShellCommand | None:
    style = detect_style(text)
    variables = Variables(style)
    for line in logical_lines(text, style):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.lower().startswith(("rem ", "::")):
            continue
        if SCRIPT_RE.search(stripped):
            return _parse_command(stripped, style, variables)
        match = {"bash": BASH_ASSIGN, "powershell": PS_ASSIGN, "cmd": CMD_ASSIGN}[style].match(stripped)
        if match:
            variables.assign(match.group(1), match.group(2))
    return None


def _parse_command(line: str, style: str, variables: Variables) -> ShellCommand:
    tokens = _split(line, style)
    for i, token in enumerate(tokens):  # the command ends at a shell operator
        if token in SHELL_STOP or token.startswith((">", "2>", "1>")):
            tokens = tokens[:i]
            break
    index = next(i for i, t in enumerate(tokens) if SCRIPT_RE.search(" " + t))
    script = SCRIPT_RE.search(" " + tokens[index]).group(1)  # type: ignore[union-attr]
    launcher = tokens[:index]
    cmd = ShellCommand(style=style, script=script, launcher=launcher, args={})
    table = load_option_table(script)
    rest = tokens[index + 1:]
    i = 0
    while i < len(rest):
        token = rest[i]
        i += 1
        if not token.startswith("--") or token == "--":
            cmd.stray.append(token)
            continue
        name, eq, inline = token[2:].partition("=")
        values: list[str] = [inline] if eq else []
        spec = table.get(name)
        kind = spec.kind if spec else None
        if not eq and kind != "flag":
            while i < len(rest) and not rest[i].startswith("--"):
                values.append(rest[i])
                i += 1
                if kind == "value":
                    break
        expanded: list[str] = []
        for value in values:
            text, missing = variables.expand(value)
            if missing:
                cmd.unresolved[name] = "$" + missing[0] if style != "cmd" else f"%{missing[0]}%"
            expanded.append(text)
        if kind == "list":
            cmd.args[name] = expanded
        elif not expanded:
            cmd.args[name] = True
        elif len(expanded) == 1:
            cmd.args[name] = expanded[0]
        else:
            cmd.args[name] = expanded
    launcher_expanded = [variables.expand(t)[0] for t in launcher]
    cmd.launcher = launcher_expanded
    return cmd


def accelerate_options(launcher: list[str]) -> dict[str, Any]:
    """`accelerate launch --num_processes 2 --multi_gpu ...` -> {"num_processes": "2", "multi_gpu": True}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(launcher):
        token = launcher[i]
        i += 1
        if not token.startswith("--"):
            continue
        name, eq, value = token[2:].partition("=")
        if not eq and i < len(launcher) and not launcher[i].startswith("-") and not launcher[i].endswith(".py"):
            value = launcher[i]
            i += 1
        out[name] = value if (eq or value) else True
    return out
