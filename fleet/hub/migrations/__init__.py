"""Alembic migrations of the hub database (run by fleet.hub.db.migrate)."""
