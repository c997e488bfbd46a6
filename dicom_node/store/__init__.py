"""Durable state: the spool (payload files) and the job store (SQLite, the one source of truth)."""
