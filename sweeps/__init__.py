"""Sweep definitions (one YAML per sweep, the file stem is its name) and their runner."""
