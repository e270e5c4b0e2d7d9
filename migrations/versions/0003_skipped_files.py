"""remember undecodable files

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-23 03:50:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # sizes and times are BIGINT on PostgreSQL (INTEGER there is 32-bit); on SQLite this DDL is as it always was
    op.create_table('skipped',
    sa.Column('path', sa.String(), nullable=False),
    sa.Column('size', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('mtime_ns', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('reason', sa.String(), nullable=False),
    sa.PrimaryKeyConstraint('path', name=op.f('pk_skipped'))
    )


def downgrade() -> None:
    op.drop_table('skipped')
