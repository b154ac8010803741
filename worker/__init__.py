"""Workers that run generation and ingest jobs: the job runner, Celery tasks, the embedded
thread. Imports ``runtime`` (and the core packages); never ``service``.
"""

import model  # noqa: F401  (first: it quiets known import-time warnings of its libraries)
