"""The per-model study scripts (``python studies/<name>.py`` or ``ld3-study <name>``)."""
