"""Hardening: hostile input, faults and load against real daemons (both backends)."""
