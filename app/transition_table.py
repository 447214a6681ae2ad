"""What the service's state machines (image builds, web services) share: a table of the moves
each transition may make, and the two questions every ``move()`` asks it."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

Transition = TypeVar("Transition", bound=Hashable)
State = TypeVar("State", bound=Hashable)


class IllegalTransition(Exception):
    """A bug: code asked for a move the table does not have."""


@dataclass(frozen=True)
class TransitionTable(Generic[Transition, State]):
    """``moves``: each transition's (from, to) pairs, ``None`` standing for no row."""

    moves: Mapping[Transition, frozenset[tuple[State | None, State | None]]]
    noun: str  # what moves: "build", "service"

    def allowed_sources(self, transition: Transition, to: State | None) -> frozenset[State | None]:
        """The states ``transition`` may move a row from to reach ``to``."""
        sources = frozenset(source for source, target in self.moves[transition] if target == to)
        if not sources:
            raise IllegalTransition(f"{transition} never moves a {self.noun} to {to or 'no row'}")
        return sources

    def only_target(self, transition: Transition) -> State | None:
        """Where ``transition`` moves a row, when it has one destination."""
        targets = {target for _, target in self.moves[transition]}
        if len(targets) != 1:
            raise IllegalTransition(f"{transition} has several outcomes; name the one meant")
        return targets.pop()
