"""Benchmarks: remote-exec side by side with its peers and the raw floors.

Not part of the installed distribution. ``python benchmarks/run.py`` is the entry
point; see ``benchmarks/README.md``.
"""
