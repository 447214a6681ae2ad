"""``extraDockerfileSteps``: one grammar for the API and both builders, and a canonical form.

Tenant text never reaches the Docker engine as it was written. It is parsed here (the API
refuses what does not parse; the builders parse it again, so a row written before a rule
existed is held to it too) and every instruction is written out anew as one physical line:
``RUN`` in JSON (exec) form around ``/bin/sh -c``, ``ENV``/``ARG``/``LABEL``/``EXPOSE`` as
checked words. Whatever the engine's own parser would make of a line, it cannot make a
second instruction out of one we wrote.

The rules are the Dockerfile's (a line continues when it ends with an unescaped ``\\``
followed only by spaces or tabs; ``#`` lines are comments, also inside a continuation;
blank lines inside a continuation are dropped; instructions are case-insensitive) but
stricter: anything the engine and this parser could read differently is refused with the
line that holds it, never passed on. That covers a trailing ``\\\\``, a backslash before a
non-breaking or other Unicode space, line breaks other than LF or CRLF (Python's
``splitlines`` splits on eleven characters, Go's scanner on one), parser directives,
heredocs and ``RUN --mount``-style flags.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

__all__ = ["ALLOWED_INSTRUCTIONS", "Step", "StepError", "parse_steps"]

ALLOWED_INSTRUCTIONS = ("RUN", "ENV", "ARG", "LABEL", "EXPOSE")

# Characters no line of a Dockerfile we write may hold: C0 controls (tab aside), DEL, C1
# controls (U+0085 is a line break to Python), the Unicode line and paragraph separators,
# a byte order mark, and lone surrogates (no UTF-8 can carry them).
_FORBIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ufeff\ud800-\udfff]")
# The engine's rule (buildkit's lineContinuationRegex for the escape token "\").
_CONTINUATION = re.compile(r"([^\\])\\[ \t]*$")
_DIRECTIVE = re.compile(r"^#\s*(syntax|escape|check)\s*=", re.IGNORECASE)
_HEREDOC = re.compile(r"<<-?\s*['\"]?[A-Za-z_][A-Za-z0-9_]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_PORT = re.compile(r"\d{1,5}(?:-\d{1,5})?(?:/(?:tcp|udp|sctp))?", re.IGNORECASE)


class StepError(ValueError):
    """The text is not a list of allowed steps; the message names the line and says why."""


@dataclass(frozen=True)
class Step:
    """One instruction: its keyword, where it starts, and its parsed arguments."""

    keyword: str  # upper case, one of ALLOWED_INSTRUCTIONS
    line: int  # 1-based line of the tenant's text where it starts
    text: str  # the arguments as the tenant wrote them, continuations joined
    argv: tuple[str, ...] = ()  # RUN: what is executed
    pairs: tuple[tuple[str, str], ...] = ()  # ENV, ARG, LABEL: name and value, quotes removed
    words: tuple[str, ...] = ()  # ENV, ARG, LABEL, EXPOSE: the words as written

    def render(self) -> str:
        """The instruction as one physical Dockerfile line that means what was parsed."""
        if self.keyword == "RUN":
            # ensure_ascii: every character outside printable ASCII becomes a \\u escape.
            return f"RUN {json.dumps(list(self.argv), ensure_ascii=True)}"
        return f"{self.keyword} {' '.join(self.words)}"

    def summary(self, limit: int = 80) -> str:
        """A short, single-line form for messages."""
        text = " ".join(f"{self.keyword} {self.text}".split())
        return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_steps(text: str) -> list[Step]:
    """Parse ``extraDockerfileSteps``; raise ``StepError`` naming the first line that fails."""
    steps: list[Step] = []
    lines = text.replace("\r\n", "\n").split("\n")
    start, parts = 0, []  # the instruction being read: its first line and its pieces
    for number, line in enumerate(lines, start=1):
        if "\r" in line:
            raise StepError(f"line {number}: a carriage return that does not end the line")
        bad = _FORBIDDEN.search(line)
        if bad:
            raise StepError(
                f"line {number}: control or line-separator character U+{ord(bad.group()):04X} is not allowed"
            )
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            if not parts and _DIRECTIVE.match(stripped):
                raise StepError(f"line {number}: parser directives ({stripped}) are not allowed in extra steps")
            continue  # the engine drops these, inside a continuation too
        continued = _CONTINUATION.search(line)
        if continued is None and stripped.endswith("\\"):
            raise StepError(
                f"line {number}: ends with a backslash that is not a line "
                "continuation to Docker (an escaped backslash, or a backslash "
                "followed by a character other than a space or tab); end the line "
                "with a single backslash, or remove it"
            )
        piece = line[: continued.start() + 1] if continued else line
        if not parts:
            start = number
        parts.append(piece)
        if continued is None:
            steps.append(_instruction("".join(parts), start))
            parts = []
    if parts:
        # A dangling continuation would swallow the instruction the builder writes next.
        raise StepError(f"line {start}: the instruction ends with a line continuation; finish it")
    return steps


def _instruction(joined: str, number: int) -> Step:
    keyword, _, rest = joined.strip().partition(" ")
    if "\t" in keyword:
        keyword, _, more = keyword.partition("\t")
        rest = f"{more} {rest}"
    keyword, rest = keyword.upper(), rest.strip(" \t")
    if keyword == "USER":
        # Extra steps run as root while building; who the image runs as is not theirs to say.
        raise StepError(
            f"line {number}: USER is not allowed: built images run as their own non-root user; "
            f"use only {', '.join(ALLOWED_INSTRUCTIONS)}"
        )
    if keyword not in ALLOWED_INSTRUCTIONS:
        raise StepError(f"line {number}: {keyword} is not allowed; use only {', '.join(ALLOWED_INSTRUCTIONS)}")
    if not rest:
        raise StepError(f"line {number}: {keyword} needs arguments")
    if keyword == "RUN":
        return Step(keyword, number, rest, argv=_run_argv(rest, number))
    words = _words(rest, number, keyword)
    if keyword == "EXPOSE":
        for word in words:
            if not _PORT.fullmatch(word):
                raise StepError(f"line {number}: EXPOSE {word}: expected a port such as 8080 or 8080/udp")
        return Step(keyword, number, rest, words=tuple(words))
    pairs = _pairs(keyword, rest, words, number)
    return Step(keyword, number, rest, pairs=tuple(pairs), words=tuple(words))


def _run_argv(rest: str, number: int) -> tuple[str, ...]:
    if rest.startswith("["):
        try:
            value = json.loads(rest)
        except ValueError:
            value = None  # the engine, too, runs text that is not a JSON array as a shell command
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            if any(_FORBIDDEN.search(v) or "\n" in v for v in value):
                raise StepError(f"line {number}: RUN arguments must not hold control characters")
            return tuple(value)
    if rest.startswith("--"):
        raise StepError(f"line {number}: RUN options ({rest.split()[0]}) are not allowed")
    if _HEREDOC.search(rest):
        raise StepError(
            f"line {number}: heredocs (<<) are not supported in extra steps; "
            "write the file with printf, or ship it as an asset"
        )
    return ("/bin/sh", "-c", rest)


def _pairs(keyword: str, rest: str, words: list[str], number: int) -> list[tuple[str, str]]:
    logical = [_unquote(w) for w in words]
    if keyword == "ARG":
        if len(words) != 1:
            raise StepError(f"line {number}: ARG takes one NAME or NAME=default")
        name, _, value = logical[0].partition("=")
        _check_name(name, _ENV_NAME, keyword, number)
        return [(name, value)]
    if "=" not in logical[0]:
        # The legacy form, "ENV NAME value with spaces": the rest of the line is the value.
        if len(words) < 2:
            raise StepError(f"line {number}: {keyword} {words[0]}: expected NAME=value")
        name = logical[0]
        _check_name(name, _ENV_NAME if keyword == "ENV" else _LABEL_KEY, keyword, number)
        value = rest[len(words[0]) :].strip(" \t")
        return [(name, _unquote(value))]
    pairs = []
    for word, plain in zip(words, logical, strict=True):
        name, sep, value = plain.partition("=")
        if not sep:
            raise StepError(f"line {number}: {keyword} {word}: expected NAME=value")
        _check_name(name, _ENV_NAME if keyword == "ENV" else _LABEL_KEY, keyword, number)
        pairs.append((name, value))
    return pairs


def _check_name(name: str, pattern: re.Pattern[str], keyword: str, number: int) -> None:
    if not pattern.fullmatch(name):
        raise StepError(f"line {number}: {keyword}: {name!r} is not a valid name")


def _words(text: str, number: int, keyword: str) -> list[str]:
    """Split on blanks outside quotes, keeping each word as written (the engine's parseWords)."""
    words, current, quote, escaped = [], "", "", False
    for ch in text:
        if escaped:
            current, escaped = current + ch, False
        elif ch == "\\" and quote != "'":
            current, escaped = current + ch, True
        elif quote:
            current += ch
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            current, quote = current + ch, ch
        elif ch.isspace():  # Go's unicode.IsSpace, as the engine splits words
            if current:
                words.append(current)
            current = ""
        else:
            current += ch
    if quote or escaped:
        raise StepError(f"line {number}: {keyword}: unterminated quote or escape")
    if current:
        words.append(current)
    return words


def _unquote(word: str) -> str:
    """The word with its quotes and escapes removed (no variable is expanded)."""
    out, quote, escaped = [], "", False
    for ch in word:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            if ch == quote:
                quote = ""
            else:
                out.append(ch)
        elif ch in "\"'":
            quote = ch
        else:
            out.append(ch)
    return "".join(out)
