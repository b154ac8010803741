"""Celery workers that run generation and ingest jobs."""
