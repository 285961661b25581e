"""A shell script (bash, PowerShell or cmd) holding an sd-scripts command line -> its arguments.

Guides share training scripts like this:

    local image_dir="$TRAIN_DIR/SETS/$training_set/"
    accelerate launch --num_cpu_threads_per_process 8 train_network.py \\
      --train_data_dir="$image_dir" --network_args "conv_dim=8" "algo=locon" ...

This module decides the script's language from its syntax as a whole (a
shebang, continuation marks, assignment forms, cmd/PowerShell keywords; one
backtick does not make a bash script PowerShell), joins continued lines (`\\`,
`^`, backtick), evaluates simple variable assignments (`NAME=value`,
`local`/`export`, PowerShell `$name = value`, cmd `set NAME=value`) so
`$image_dir`, `${x}` and `%X%` expand, and splits the `train_network.py` line
into options. It never runs the script: a value that needs a command
(`$(...)`, backticks, a PowerShell expression) is reported, not imported as text.
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
# Text only a shell could work out: command substitution, arithmetic, backtick commands (bash); a
# subexpression or array (PowerShell).
BASH_SUBSTITUTION = re.compile(r"\$\((?:[^()]|\([^()]*\))*\)?|`[^`]*`?")
PS_SUBSTITUTION = re.compile(r"[$@]\((?:[^()]|\([^()]*\))*\)?")
# A PowerShell value import can take as it is: a quoted string or one plain word/number/path.
PS_PLAIN_VALUE = re.compile(r"""^(?:"[^"`$]*(?:\$[A-Za-z_]\w*[^"`$]*)*"|'[^']*'|[\w.:\\/+-]+)$""")
SHEBANG_RE = re.compile(r"^#!\s*(\S+)(?:\s+(\S+))?")


@dataclass
class ShellCommand:
    style: str  # bash | powershell | cmd
    script: str  # train_network.py or sdxl_train_network.py
    launcher: list[str]  # tokens before the script (accelerate launch ... / python)
    args: dict[str, Any]  # option -> True (flag) | text | list of text
    unresolved: dict[str, str] = field(default_factory=dict)  # option -> the variable it could not expand
    stray: list[str] = field(default_factory=list)  # tokens that belong to no option


def detect_style(text: str) -> str:
    """bash, powershell or cmd, from the whole script: a shebang decides; otherwise each line's syntax votes
    (continuation marks, assignment forms, keywords) and the most votes win, bash on a tie."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    if lines and (m := SHEBANG_RE.match(lines[0])):
        program = m.group(1).rsplit("/", 1)[-1].lower()
        if program == "env" and m.group(2):
            program = m.group(2).lower()
        return "powershell" if program.startswith(("pwsh", "powershell")) else "bash"
    votes = {"bash": 0, "powershell": 0, "cmd": 0}
    for line in lines:
        for style, weight in _line_votes(line):
            votes[style] += weight
    best = max(votes.values())
    return "bash" if votes["bash"] == best else max(votes, key=lambda k: votes[k])


def _line_votes(line: str) -> list[tuple[str, int]]:
    stripped = line.strip()
    lower = stripped.lower()
    out: list[tuple[str, int]] = []
    if line.endswith("\\") and not line.endswith("\\\\"):
        out.append(("bash", 2))
    if line.endswith("`") and line.count("`") % 2 == 1:  # an odd backtick at the end continues; `cmd` does not
        out.append(("powershell", 2))
    if line.endswith("^"):
        out.append(("cmd", 2))
    if BASH_ASSIGN.match(stripped) and not lower.startswith("set "):
        out.append(("bash", 1))
    if PS_ASSIGN.match(stripped):
        out.append(("powershell", 2))
    if CMD_ASSIGN.match(stripped) or lower.startswith(("@echo", "rem ", "::", "call ", "goto ", "setlocal")):
        out.append(("cmd", 2))
    if CMD_VAR.search(stripped):
        out.append(("cmd", 1))
    if re.match(r"^(?:fi|then|done|do|esac|source\s|\.\s|if\s+\[|for\s+\w+\s+in\s)", stripped) or "$(" in stripped \
            and "$env:" not in stripped:
        out.append(("bash", 1))
    if "$env:" in lower or re.match(r"^(?:param\s*\(|write-host\b|set-location\b|& )", lower):
        out.append(("powershell", 2))
    return out


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
        if self.style == "powershell" and raw.strip() and not PS_PLAIN_VALUE.match(raw.strip()):
            self.known.pop(self._key(name), None)  # an expression, a call, an array: never evaluated
            self.unknown.add(self._key(name))
            return
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

    def expand(self, text: str, substitutions: bool = True) -> tuple[str, list[str]]:
        """Text with known variables substituted, and what could not be, as written: `$name`, `%NAME%`, or a
        command substitution such as `$(date +%F)` (import never runs anything; `substitutions=False` when the
        caller has taken them out already)."""
        missing: list[str] = []

        def sub(match: re.Match[str]) -> str:
            name = next(g for g in match.groups() if g)
            key = self._key(name)
            if key in self.known:
                return self.known[key]
            missing.append(f"%{name}%" if self.style == "cmd" else f"${name}")
            return match.group(0)

        if self.style == "cmd":
            text = CMD_VAR.sub(sub, text)
        else:
            # single-quoted text is literal in bash and PowerShell
            substitution = BASH_SUBSTITUTION if self.style == "bash" else PS_SUBSTITUTION
            parts = re.split(r"('[^']*')", text)
            for part in parts if substitutions else []:
                if not (part.startswith("'") and part.endswith("'") and len(part) > 1):
                    missing += [m.group(0) for m in substitution.finditer(part)]
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


HIDDEN = re.compile("\x00(\\d+)\x00")  # a command substitution, reported
LITERAL = re.compile("\x01(\\d+)\x01")  # single-quoted text, kept as it is


def _hide_substitutions(line: str, style: str) -> tuple[str, list[str], list[str]]:
    """Replace each command substitution by a placeholder, so splitting the line at spaces keeps
    `$(date +%F)` in one piece (the originals come back in the reports), and each single-quoted piece by
    another, so nothing inside it is expanded (bash and PowerShell take it literally)."""
    if style == "cmd":
        return line, [], []
    pattern = BASH_SUBSTITUTION if style == "bash" else PS_SUBSTITUTION
    found: list[str] = []
    literal: list[str] = []

    def hide(match: re.Match[str]) -> str:
        found.append(match.group(0))
        return f"\x00{len(found) - 1}\x00"

    def keep(quoted: str) -> str:
        literal.append(quoted[1:-1])
        return f"\x01{len(literal) - 1}\x01"

    parts = re.split(r"('[^']*')", line)
    return "".join(keep(p) if p.startswith("'") and p.endswith("'") and len(p) > 1 else pattern.sub(hide, p)
                   for p in parts), found, literal


def _parse_command(line: str, style: str, variables: Variables) -> ShellCommand:
    line, hidden, literal = _hide_substitutions(line, style)

    def expand(value: str) -> tuple[str, list[str]]:
        text, missing = variables.expand(value, substitutions=False)
        missing = [hidden[int(n)] for n in HIDDEN.findall(text)] + missing
        text = HIDDEN.sub(lambda m: hidden[int(m.group(1))], text)
        return LITERAL.sub(lambda m: literal[int(m.group(1))], text), missing

    tokens = _split(line, style)
    for i, token in enumerate(tokens):  # the command ends at a shell operator
        if token in SHELL_STOP or token.startswith((">", "2>", "1>")):
            tokens = tokens[:i]
            break
    index = next(i for i, t in enumerate(tokens) if SCRIPT_RE.search(" " + expand(t)[0]))
    script = SCRIPT_RE.search(" " + expand(tokens[index])[0]).group(1)  # type: ignore[union-attr]
    launcher = tokens[:index]
    cmd = ShellCommand(style=style, script=script, launcher=launcher, args={})
    table = load_option_table(script)
    rest = tokens[index + 1:]
    i = 0
    while i < len(rest):
        token = rest[i]
        i += 1
        if not token.startswith("--") or token == "--":
            cmd.stray.append(expand(token)[0])
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
            text, missing = expand(value)
            if missing:
                cmd.unresolved[name] = missing[0]
            expanded.append(text)
        if kind == "list":
            cmd.args[name] = expanded
        elif not expanded:
            cmd.args[name] = True
        elif len(expanded) == 1:
            cmd.args[name] = expanded[0]
        else:
            cmd.args[name] = expanded
    launcher_expanded = [expand(t)[0] for t in launcher]
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
