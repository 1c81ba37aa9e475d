"""Built-in defenses, one per module."""
