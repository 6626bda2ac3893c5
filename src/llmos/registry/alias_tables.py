"""Tables of an alias's canary and history (``registry/aliases.py``), beside ``tables.py`` on the
same declarative base. Both go with their alias (a composite foreign key's cascade) and with the
version they name, so a deleted version never stays in a split or becomes a rollback's target."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, Float, ForeignKey, ForeignKeyConstraint, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from llmos.registry.tables import Base, utcnow


def _alias_key() -> ForeignKeyConstraint:
    """(name, alias) -> the alias row (a constraint belongs to one table: one each)."""
    return ForeignKeyConstraint(["name", "alias"], ["model_aliases.name", "model_aliases.alias"], ondelete="CASCADE")


class ModelAliasCanaryRow(Base):
    """A version that ``name@alias`` sends ``weight`` percent of its requests to; the alias's own
    target takes what the canaries leave."""

    __tablename__ = "model_alias_canaries"
    __table_args__ = (_alias_key(),)

    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True, index=True)
    weight: Mapped[float] = mapped_column(Float)


class ModelAliasHistoryRow(Base):
    """One target ``name@alias`` was moved to, appended; a rollback marks the newest one
    ``rolled_back`` and returns to the one before it that is not."""

    __tablename__ = "model_alias_history"
    __table_args__ = (_alias_key(),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(256), index=True)
    alias: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    set_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    rolled_back: Mapped[bool] = mapped_column(Boolean, default=False)
