"""Benchmarks against bare Gunicorn and a naive tracker, run by ``make bench``."""
