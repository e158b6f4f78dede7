"""The confirmations table (lamsonfilter.confirm): pending confirmations by token hash.

Revision ID: 0002
Revises: 0001

One row per confirmation asked for; the token itself is never stored, only
its SHA-256 (hex).  ``expires_at`` is indexed for the purge of old rows.
A database adopted from schema version 4 (lamsonfilter.confirm before
migrations) has the table already, with the same columns: it is kept.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("lamsonfilter_confirmations"):
        return  # schema version 4 from before migrations had it, exactly so: keep its rows
    op.create_table(
        "lamsonfilter_confirmations",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("sender", sa.String(512), nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("message", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        "ix_lamsonfilter_confirmations_expires_at", "lamsonfilter_confirmations", ["expires_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_lamsonfilter_confirmations_expires_at", "lamsonfilter_confirmations")
    op.drop_table("lamsonfilter_confirmations")
