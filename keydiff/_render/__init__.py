"""Presenters of a ``Diff``: rich renderables, DataFrames. Each is a view over the same values."""
