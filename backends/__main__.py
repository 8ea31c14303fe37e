"""Print the detected backend and the sandbox trainer runs get: `python -m backends [BACKEND]`."""

import sys

from backends import BackendError, describe, detect


def main() -> int:
    try:
        print(describe(detect(sys.argv[1] if len(sys.argv) > 1 else None)))
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from sandbox.confine import SandboxError  # lazily: backend line first
    from sandbox.confine import describe as describe_sandbox

    try:
        print(describe_sandbox())
    except SandboxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


sys.exit(main())
