"""Built-in models, one per module."""
