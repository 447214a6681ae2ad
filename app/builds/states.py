"""The states of an image's build, the one vocabulary every layer uses for them."""

from __future__ import annotations

import enum


class CreationState(enum.StrEnum):
    """NotStarted → Running → Succeeded | Failed | Cancelled (app.builds.transitions has every move)."""

    NOT_STARTED = "NotStarted"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL


FINAL = frozenset({CreationState.SUCCEEDED, CreationState.FAILED, CreationState.CANCELLED})
UNFINISHED = frozenset({CreationState.NOT_STARTED, CreationState.RUNNING})
WITH_ERROR = frozenset({CreationState.FAILED, CreationState.CANCELLED})  # ended with a reason to show


class SmokeTestResult(enum.StrEnum):
    """Whether a built image was started once (init() ran, GET / answered) before it was called good."""

    PASSED = "Passed"
    FAILED = "Failed"  # the build failed with it
    SKIPPED = "Skipped"  # no engine could run it: the image says why


SMOKE_TEST_REASON_LENGTH = 500

# Not a state a build is in: what an event of an image's deletion says (never stored on the image).
DELETED_STATE = "Deleted"


def is_unfinished(state: str) -> bool:
    """Whether a state read from an event (a CreationState, or Deleted) is still moving."""
    return state in UNFINISHED


def build_error(state: str, error: str | None) -> tuple[str, str] | None:
    """The (code, message) a failed or cancelled build shows its tenant; None otherwise."""
    if state in WITH_ERROR and error:
        return f"Build{state}", error
    return None
