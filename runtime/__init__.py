"""What the HTTP service and the workers share: settings, job records and their stores,
metrics, dispatch, the builders of long-lived objects and the one generation path.

Imports ``model`` and ``memory_bank``; never ``service``, ``worker`` or ``ditmem``.
"""

import model  # noqa: F401  (first: it quiets known import-time warnings of its libraries)
