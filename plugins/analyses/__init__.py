"""Built-in analyses, one per module."""
