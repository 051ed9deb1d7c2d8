"""Tests of the I/O-free core: frames, codecs, registry, errors and the sans-I/O protocol."""

from __future__ import annotations
