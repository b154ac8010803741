"""Entry points: the ``ditmem`` command line, the composition root that wires the API and the
workers, the demo and the toy-world workflows. The only package that may import every other.
"""

import model  # noqa: F401  (first: it quiets known import-time warnings of its libraries)
