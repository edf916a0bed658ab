"""Data: dataset formats (Geometry3K, MathVista, preference pairs), the synthetic task, prompts and
collation."""

from .formats import Example, PreferencePair, RowError, read_geometry3k, read_mathvista, read_preference_pairs

__all__ = ["Example", "PreferencePair", "RowError", "read_geometry3k", "read_mathvista", "read_preference_pairs"]
