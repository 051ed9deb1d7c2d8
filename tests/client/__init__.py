"""Tests of the client side: decorators, contexts and executors."""

from __future__ import annotations
