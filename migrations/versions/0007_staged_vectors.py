"""staged vectors of a model switch (mmsearch reindex)

``mmsearch --model NEW reindex`` fills this table with the new model's
vectors while the home keeps answering with the old ones, then moves them
into ``images`` and ``texts`` in one transaction and empties it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 13:10:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('staged_vectors',
    sa.Column('kind', sa.String(), nullable=False),
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('source', sa.String(), nullable=False),
    sa.Column('vector', sa.LargeBinary(), nullable=False),
    sa.Column('size', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('mtime_ns', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('width', sa.Integer(), nullable=True),
    sa.Column('height', sa.Integer(), nullable=True),
    sa.PrimaryKeyConstraint('kind', 'id', name=op.f('pk_staged_vectors'))
    )


def downgrade() -> None:
    op.drop_table('staged_vectors')
