"""The extraDockerfileSteps grammar: smuggling refused, accepted steps written anew."""

from __future__ import annotations

import re

import pytest

from app.dockerfile_steps import StepError, parse_steps
from tests.dockerfile_smuggling import ACCEPTED, SMUGGLING

# The engine's rule for a continued line, and what it reads as a line break.
_ENGINE_CONTINUES = re.compile(r"([^\\])\\[ \t]*$")


@pytest.mark.parametrize("name", SMUGGLING)
def test_every_smuggling_attempt_is_refused_naming_why(name: str) -> None:
    text, fragment = SMUGGLING[name]
    with pytest.raises(StepError) as refused:
        parse_steps(text)
    assert fragment in str(refused.value)


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_steps_render_as_one_engine_line_each(name: str) -> None:
    text, expected = ACCEPTED[name]
    rendered = [step.render() for step in parse_steps(text)]
    assert rendered == expected
    for line in rendered:
        # One physical line of printable ASCII that the engine cannot continue.
        assert line.isascii() and line.isprintable(), line
        assert not _ENGINE_CONTINUES.search(line) and not line.rstrip().endswith("\\")
        assert line.split(" ", 1)[0] in ("RUN", "ENV", "ARG", "LABEL", "EXPOSE")


def test_pairs_are_read_as_the_engine_reads_them() -> None:
    env, label, arg = parse_steps("ENV A=1 \"B=two words\" C='x y' D=a\\ b\nLABEL team=ml\nARG V")
    assert env.pairs == (("A", "1"), ("B", "two words"), ("C", "x y"), ("D", "a b"))
    assert label.pairs == (("team", "ml"),) and arg.pairs == (("V", ""),)
    # Words split on any Unicode space, as the engine's word splitter does: no hidden pair.
    (split,) = parse_steps("ENV A=b\u00a0C=d")
    assert split.pairs == (("A", "b"), ("C", "d"))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("ENV 1A=x", "not a valid name"),
        ("ENV A", "expected NAME=value"),
        ("ENV A=1 B", "expected NAME=value"),
        ('ENV A="open', "unterminated quote"),
        ("ARG A=1 B=2", "ARG takes one"),
        ("EXPOSE $PORT", "expected a port"),
        ("EXPOSE 80/icmp", "expected a port"),
        ("RUN", "RUN needs arguments"),
        ('RUN ["sh", "-c", "a\\nb"]', "control characters"),
    ],
)
def test_malformed_steps_are_refused_naming_the_line(text: str, fragment: str) -> None:
    with pytest.raises(StepError, match=re.escape(fragment)) as refused:
        parse_steps(f"RUN true\n{text}")
    assert str(refused.value).startswith("line 2:")
