"""drop the index on images.content_hash

Content hashes are random, so every bulk insert wrote into pages all over
that index, and each transaction copied them to the WAL again: at 100,000
rows, inserts ran ~16-22% slower with it, and the cost grew with the
catalog. The indexer now finds a reusable vector by the id it read with the
rest of the catalog's state, and checks the hash on that row.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 08:20:00
"""
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_images_content_hash'))


def downgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_images_content_hash'), ['content_hash'], unique=False)
