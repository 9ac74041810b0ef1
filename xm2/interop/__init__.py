"""Conversions between xm2's checkpoint layouts and other formats."""
