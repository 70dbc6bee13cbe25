"""Runnable stress, chaos and benchmark scenarios for procpool (``python -m stress``)."""
