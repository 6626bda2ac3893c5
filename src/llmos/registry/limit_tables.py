"""Tables of the shared rate limiter (``security.shared_limits``): one row per limited subject
(the row every admission of that subject locks), the requests and tokens of the last minute, and
the leases of requests in flight.

Kept beside ``tables.py`` on the same declarative base (so one metadata holds every table). Times
are epoch seconds as floats: every server compares them with its own wall clock."""

from __future__ import annotations

from sqlalchemy import Float, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from llmos.registry.tables import Base


class RateSubjectRow(Base):
    __tablename__ = "rate_subjects"

    subject: Mapped[str] = mapped_column(String(128), primary_key=True)
    touched_at: Mapped[float] = mapped_column(Float)


class RateEventRow(Base):
    __tablename__ = "rate_events"
    __table_args__ = (Index("ix_rate_events_subject_at", "subject", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(128))
    at: Mapped[float] = mapped_column(Float)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(Integer, default=0)


class RateLeaseRow(Base):
    __tablename__ = "rate_leases"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    subject: Mapped[str] = mapped_column(String(128), index=True)
    expires_at: Mapped[float] = mapped_column(Float)
