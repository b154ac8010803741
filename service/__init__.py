"""The HTTP API: FastAPI app, routes, schemas, auth and the web UI.

Imports ``runtime`` (and the core packages); never ``worker``: what runs jobs is handed to
:func:`service.app.create_app` by the composition root (``ditmem.compose``).
"""

import model  # noqa: F401  (first: it quiets known import-time warnings of its libraries)
