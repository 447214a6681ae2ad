"""Tests of the scoring server that goes into every built image."""
