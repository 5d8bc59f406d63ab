"""Hydra launcher plugin of this project: each job of a sweep in its own process (`process_per_job.py`)."""
