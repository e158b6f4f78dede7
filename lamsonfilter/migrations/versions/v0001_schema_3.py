"""lamsonfilter's tables as schema version 3 had them: state, outbox, tokens, meta.

Revision ID: 0001
Revises: (none)

The first revision also adopts a database made before lamsonfilter used
Alembic (``lamsonfilter_meta`` says ``schema_version`` 1 to 4): the
tables that exist are kept with every row, the outbox gets the columns its
version lacks (2: ``next_attempt_at``, ``failed_at``, ``last_error``; 3:
``claimed_by``, ``claimed_until``; all nullable, so ``ALTER TABLE ... ADD
COLUMN`` keeps the rows on SQLite and PostgreSQL alike), and the version
row says 3 (or 4, left as it is: see revision 0002).  Later revisions leave
it alone, so a lamsonfilter from before migrations keeps running against a
database whose revisions since only add tables; a revision it must not
run against sets it to 5.  A fresh database gets the four tables.  The tables are
declared here, not imported: a revision is a snapshot, and
`lamsonfilter.store.schema` moves on.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_META = sa.MetaData()

_STATE = sa.Table(
    "lamsonfilter_state", _META,
    sa.Column("key", sa.String(512), primary_key=True),
    sa.Column("state", sa.String(64), nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

_OUTBOX = sa.Table(
    "lamsonfilter_outbox", _META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("sender", sa.Text, nullable=False),
    sa.Column("recipients", sa.Text, nullable=False),
    sa.Column("raw", sa.LargeBinary, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True, index=True),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("claimed_by", sa.String(255), nullable=True),
    sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
)

_TOKENS = sa.Table(
    "lamsonfilter_tokens", _META,
    sa.Column("token", sa.String(512), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

_META_TABLE = sa.Table(
    "lamsonfilter_meta", _META,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
)

#: The outbox's columns added by schema versions 2 and 3, in that order.
_ADDED = ("next_attempt_at", "failed_at", "last_error", "claimed_by", "claimed_until")


def upgrade() -> None:
    bind = op.get_bind()
    _META.create_all(bind, checkfirst=True)  # a fresh database, or tables an old one lacks
    have = {c["name"] for c in sa.inspect(bind).get_columns(_OUTBOX.name)}
    for name in _ADDED:
        if name not in have:
            column = _OUTBOX.c[name]
            op.add_column(_OUTBOX.name, sa.Column(name, column.type, nullable=True))
    version = bind.execute(
        sa.select(_META_TABLE.c.value).where(_META_TABLE.c.name == "schema_version")
    ).scalar_one_or_none()
    if version is None:
        bind.execute(sa.insert(_META_TABLE).values(name="schema_version", value="3"))
    elif version.isdigit() and int(version) < 3:  # 4 (the confirmations table too) stays
        bind.execute(
            sa.update(_META_TABLE).where(_META_TABLE.c.name == "schema_version").values(value="3")
        )


def downgrade() -> None:
    for table in reversed(_META.sorted_tables):
        op.drop_table(table.name)
