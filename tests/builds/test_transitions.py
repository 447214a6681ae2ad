"""The transition table: every move it lists applies (with its event), every other is refused
by the conditional UPDATE itself, and nothing outside app/builds writes a build's state."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from app.builds import CreationState
from app.builds.lifecycle import cancel_build, delete_build
from app.builds.states import FINAL
from app.builds.transitions import GONE, SILENT, TRANSITIONS, IllegalTransition, Transition, allowed_sources, move
from app.errors import Conflict, NotFound
from app.orm import Event, Image

ROOT = Path(__file__).resolve().parents[2]
MOVES = [(transition, source, target) for transition, pairs in TRANSITIONS.items() for source, target in pairs]


def _events(db: Session, image: Image) -> int:
    return db.scalar(select(func.count()).select_from(Event).where(Event.subject_id == image.id)) or 0


def _put(db: Session, image: Image, state: CreationState) -> None:
    image.state = state
    db.flush()


@pytest.mark.parametrize(
    ("transition", "source", "target"),
    [m for m in MOVES if m[0] is not Transition.CREATE],
    ids=lambda v: str(v) if v is not None else "gone",
)
def test_every_move_in_the_table_applies_and_tells_of_itself(
    db: Session, image: Image, transition: Transition, source: CreationState, target: CreationState | None
) -> None:
    _put(db, image, source)
    before = _events(db, image)
    assert move(db, transition, Image.id == image.id, to=target)
    if target is GONE:
        assert db.scalar(select(Image.id).where(Image.id == image.id)) is None
        assert _events(db, image) == before + 1  # the deletion event
        return
    db.refresh(image)
    assert image.state is target
    assert _events(db, image) == before + (0 if transition in SILENT else 1)


@pytest.mark.parametrize("transition", [t for t in Transition if t is not Transition.CREATE])
def test_every_move_not_in_the_table_is_refused_and_writes_nothing(
    db: Session, image: Image, transition: Transition
) -> None:
    for target in {target for _, target in TRANSITIONS[transition]}:
        for state in set(CreationState) - allowed_sources(transition, target):
            _put(db, image, state)
            before = _events(db, image)
            written = {} if target is GONE else {"error": "must not be written"}
            assert not move(db, transition, Image.id == image.id, to=target, **written)
            db.refresh(image)
            assert (image.state, image.error, _events(db, image)) == (state, None, before)


def test_a_destination_the_table_does_not_list_is_a_bug() -> None:
    with pytest.raises(IllegalTransition):
        allowed_sources(Transition.FINISH, CreationState.NOT_STARTED)
    with pytest.raises(IllegalTransition):
        allowed_sources(Transition.CANCEL, CreationState.SUCCEEDED)
    with pytest.raises(IllegalTransition, match="several outcomes"):
        move(None, Transition.FINISH)  # type: ignore[arg-type]  # which outcome?
    with pytest.raises(IllegalTransition, match="create"):
        move(None, Transition.CREATE)  # type: ignore[arg-type]


def test_a_final_build_only_ever_goes_away() -> None:
    assert {target for _, source, target in MOVES if source in FINAL} == {GONE}
    # Back to the queue only from Running (a hand-back, a lapsed lease), never from an end.
    back = {source for _, source, target in MOVES if target is CreationState.NOT_STARTED and source != target}
    assert back == {GONE, CreationState.RUNNING}


def test_cancelling_a_finished_build_is_a_409_and_deleting_a_running_one_too(db: Session, image: Image) -> None:
    _put(db, image, CreationState.SUCCEEDED)
    with pytest.raises(Conflict) as finished:
        cancel_build(db, image)
    assert (finished.value.status_code, finished.value.code) == (409, "ImageBuildFinished")
    assert "Succeeded" in finished.value.message

    _put(db, image, CreationState.RUNNING)
    assert cancel_build(db, image).cancel_requested is True and image.state is CreationState.RUNNING
    with pytest.raises(Conflict) as running:
        delete_build(db, image)
    assert (running.value.status_code, running.value.code) == (409, "ImageBuildRunning")


def test_the_database_refuses_a_state_that_is_not_one(db: Session, image: Image) -> None:
    with pytest.raises(IntegrityError), db.begin_nested():
        db.execute(text("UPDATE images SET state = 'Paused' WHERE id = :id"), {"id": image.id.hex})
    with pytest.raises(StatementError, match="not among the defined enum values"):  # and the ORM never sends one
        _put(db, image, "Paused")  # type: ignore[arg-type]


# Writing the state: an UPDATE or DELETE of images, or a state set on an Image.
_WRITES = re.compile(r"update\(Image\)|delete\(Image\)|\.state\s*=[^=]|\bstate=CreationState")


def test_only_app_builds_writes_a_builds_state() -> None:
    writers = {
        str(path.relative_to(ROOT))
        for top in ("app", "workers")
        for path in (ROOT / top).rglob("*.py")
        if _WRITES.search(path.read_text())
    }
    assert writers <= {"app/builds/transitions.py"}, writers


def test_a_build_another_request_deleted_meanwhile_is_not_found_by_a_cancel_or_a_delete(
    db: Session, image: Image
) -> None:
    assert move(db, Transition.DELETE, Image.id == image.id, to=None)  # the other request's delete
    with pytest.raises(NotFound):
        delete_build(db, image)
    with pytest.raises(NotFound):
        cancel_build(db, image)
