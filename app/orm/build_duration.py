"""How long finished builds took, as a Prometheus histogram kept in the database.

A row per builder, final state and bucket bound (``le``, as Prometheus writes it: ``"60.0"``,
``"+Inf"``): how many builds ended within that bound and their seconds added up. Rows are
only ever incremented, in the transaction that finishes a build (``app.builds.durations``),
so the figures never fall, whichever worker on whichever machine finished the build, and
whatever is deleted afterwards.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, String
from sqlalchemy.orm import Mapped, mapped_column

from app.orm.base import Base


class BuildDurationBucket(Base):
    __tablename__ = "build_duration_buckets"

    builder: Mapped[str] = mapped_column(String(16), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    le: Mapped[str] = mapped_column(String(16), primary_key=True)
    builds: Mapped[int] = mapped_column(BigInteger)
    seconds: Mapped[float] = mapped_column(Float)
