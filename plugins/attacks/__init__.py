"""Built-in attacks, one per module."""
