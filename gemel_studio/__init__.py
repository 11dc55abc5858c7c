"""GEMEL Studio: fit many vision models onto one memory-starved edge GPU."""

__version__ = "0.1.0"
