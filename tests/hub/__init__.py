"""Tests of the hub (fleet/hub), on SQLite and PostgreSQL."""
