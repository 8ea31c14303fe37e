"""Print the detected backend: `python -m backends [BACKEND]`."""

import sys

from backends import BackendError, describe, detect

try:
    print(describe(detect(sys.argv[1] if len(sys.argv) > 1 else None)))
except BackendError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
