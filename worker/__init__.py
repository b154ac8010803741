"""Workers that run generation and ingest jobs: the job runner, Celery tasks, the embedded
thread. Imports ``runtime`` (and the core packages); never ``service``.
"""
