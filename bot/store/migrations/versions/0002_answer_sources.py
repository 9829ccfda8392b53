"""answer.sources: the team knowledge an answer used, so its citations survive a re-render

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 12:00:00

A nullable JSON column: rows written before it simply cite nothing. The answer message is
re-rendered from the rows after every verdict (`bot.slack.cards`), so what it cited must be
stored with it rather than recomputed (the knowledge base will have changed by then).
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("answer", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sources", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("answer", schema=None) as batch_op:
        batch_op.drop_column("sources")
