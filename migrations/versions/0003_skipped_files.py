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
    op.create_table('skipped',
    sa.Column('path', sa.String(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('mtime_ns', sa.Integer(), nullable=False),
    sa.Column('reason', sa.String(), nullable=False),
    sa.PrimaryKeyConstraint('path', name=op.f('pk_skipped'))
    )


def downgrade() -> None:
    op.drop_table('skipped')
