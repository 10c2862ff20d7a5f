"""Foundations shared by every layer: errors, argument checks, extras, stats, shared memory.

Imports nothing from the layers above it.
"""
