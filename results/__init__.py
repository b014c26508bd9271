"""The results store: the farm's system of record (SQLite by default, any SQLAlchemy URL)."""
