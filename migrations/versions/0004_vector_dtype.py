"""record how the catalog stores vectors: float16 for new catalogs

Vectors written before this revision are float32 and stay so: a catalog that
already holds rows is marked float32, an empty one float16 (half the bytes,
and faster bulk inserts; cosine scores of 512-d unit vectors move by
under 1e-4).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 05:35:00
"""
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "INSERT INTO meta (key, value) SELECT 'vector_dtype', "
        "CASE WHEN EXISTS (SELECT 1 FROM images) OR EXISTS (SELECT 1 FROM texts) THEN 'float32' ELSE 'float16' END "
        "WHERE NOT EXISTS (SELECT 1 FROM meta WHERE key = 'vector_dtype')"
    )


def downgrade() -> None:
    conn = op.get_bind()
    dtype = conn.exec_driver_sql("SELECT value FROM meta WHERE key = 'vector_dtype'").scalar()
    rows = conn.exec_driver_sql("SELECT EXISTS (SELECT 1 FROM images) OR EXISTS (SELECT 1 FROM texts)").scalar()
    if dtype == "float16" and rows:
        raise RuntimeError("this catalog holds float16 vectors, which revisions before 0004 cannot read")
    op.execute("DELETE FROM meta WHERE key = 'vector_dtype'")
