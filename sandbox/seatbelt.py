"""Seatbelt profile for a trainer run on macOS (`sandbox-exec -p PROFILE PROGRAM ...`).

UNTESTED ON HARDWARE. This profile has been generated and checked as text (tests/test_sandbox.py)
but has never confined a real run on a Mac; the Metal rules follow what other Seatbelt users
report (Codex CLI's and Chromium's profiles, and a llama.cpp server confined with exactly the
two GPU rules below). Expect to adjust it the first time it runs there.

The profile denies by default and then allows:
- starting processes (children inherit the profile), signals and process information only
  within the sandbox;
- reading the system (frameworks, dyld cache, /usr, a short list of /private/etc files,
  time zones, Homebrew's and python.org's prefixes), the Python installation and the policy's
  read paths: `subpath` for directories, `literal` for files; metadata (stat) of their
  ancestor directories, which path resolution needs;
- writing only the policy's write paths and /dev/null;
- a named list of sysctls (hardware and OS identification; not kern.procargs*, which would
  show other processes' arguments and environment), the directory service lookup behind
  getpwuid, POSIX semaphores (Python's multiprocessing locks);
- with `gpu`: opening the GPU's IOKit user clients, reading IOKit properties and looking up
  the Metal compiler service.
Network is denied outright. What it cannot do: macOS enforces neither RLIMIT_AS nor a per-run
RLIMIT_NPROC, and a process that calls setsid leaves the loop's process group while staying
sandboxed; the loop has to find and end it (sandbox.confine.kill_orphans is Linux-only).
Metal keeps its shader cache under the user's cache directory (`getconf DARWIN_USER_CACHE_DIR`);
if MLX needs it writable, the runner adds a per-run directory there to the write paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

SANDBOX_EXEC = "/usr/bin/sandbox-exec"

# Directories every macOS process reads (dyld's shared cache lives under /System or
# /private/var/db/dyld depending on the release; Python from Homebrew or python.org links
# libraries from those prefixes by absolute path).
SYSTEM_DIRS = ("/System", "/usr/lib", "/usr/libexec", "/usr/share", "/usr/bin", "/usr/sbin",
               "/bin", "/sbin", "/Library/Frameworks", "/Library/Apple", "/private/var/db/dyld",
               "/private/var/db/timezone", "/opt/homebrew", "/usr/local", "/private/etc/ssl")
SYSTEM_FILES = ("/private/etc/passwd", "/private/etc/group", "/private/etc/hosts",
                "/private/etc/localtime", "/private/etc/resolv.conf", "/private/etc/services",
                "/private/etc/protocols", "/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")

SYSCTL_PREFIXES = ("hw.", "machdep.cpu.")
SYSCTL_NAMES = ("kern.argmax", "kern.hostname", "kern.maxfilesperproc", "kern.maxproc",
                "kern.osproductversion", "kern.osrelease", "kern.ostype", "kern.osvariant_status",
                "kern.osversion", "kern.secure_kernel", "kern.usrstack64", "kern.version",
                "sysctl.proc_cputype", "vm.loadavg")

GPU_RULES = """\
(allow iokit-open
  (iokit-user-client-class "IOGPUDeviceUserClient")
  (iokit-user-client-class "AGXDeviceUserClient")
  (iokit-user-client-class "IOSurfaceRootUserClient"))
(allow iokit-get-properties)
(allow mach-lookup (global-name "com.apple.MTLCompilerService"))"""


class ProfileError(ValueError):
    """A path that cannot be written into a profile safely."""


def quote(text: str) -> str:
    """`text` as an SBPL string literal: backslash and quote escaped, control characters refused.

    A directory named `x") (allow file-read* (subpath "/")` stays one string, not a new rule.
    """
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ProfileError(f"control character in path {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _spellings(path: str | Path) -> list[str]:
    """The path as given and, where different, resolved (/tmp is /private/tmp on macOS)."""
    given = os.path.abspath(path)
    real = os.path.realpath(given)
    return [given] if real == given else [given, real]


def _filters(paths: Iterable[str | Path], dirs: bool | None = None) -> list[str]:
    """`(subpath ...)` for directories and `(literal ...)` for files; `dirs` overrides the test."""
    out: list[str] = []
    for path in paths:
        for spelling in _spellings(path):
            is_dir = os.path.isdir(spelling) if dirs is None else dirs
            out.append(f"({'subpath' if is_dir else 'literal'} {quote(spelling)})")
    return list(dict.fromkeys(out))


def _ancestors(paths: Iterable[str | Path]) -> list[str]:
    seen: dict[str, None] = {"/": None}
    for path in paths:
        for spelling in _spellings(path):
            for parent in Path(spelling).parents:
                seen[str(parent)] = None
    return [f"(literal {quote(p)})" for p in seen]


def _rule(action: str, operations: str, filters: Sequence[str]) -> str:
    if not filters:
        return ""
    body = "\n".join(f"  {f}" for f in filters)
    return f"({action} {operations}\n{body})"


def build_profile(read: Sequence[str | Path], write: Sequence[str | Path], gpu: bool = False) -> str:
    """The SBPL profile: `read` (policy paths and the Python installation) readable, `write`
    readable and writable, the system readable, everything else denied. Raises ProfileError."""
    sysctls = [f"(sysctl-name-prefix {quote(p)})" for p in SYSCTL_PREFIXES]
    sysctls += [f"(sysctl-name {quote(n)})" for n in SYSCTL_NAMES]
    parts = [
        "(version 1)",
        "(deny default)",
        "(allow process-fork)",
        "(allow process-exec)",
        "(allow signal (target same-sandbox))",
        "(allow process-info* (target same-sandbox))",
        "(allow user-preference-read)",
        "(allow ipc-posix-sem)",
        '(allow mach-lookup (global-name "com.apple.system.opendirectoryd.libinfo"))',
        _rule("allow", "sysctl-read", sysctls),
        _rule("allow", "file-read-metadata", _ancestors([*SYSTEM_DIRS, *read, *write])),
        _rule("allow", "file-read*", _filters(SYSTEM_DIRS, dirs=True)
              + _filters(SYSTEM_FILES, dirs=False) + _filters(read)),
        _rule("allow", "file-read* file-write*", _filters(write, dirs=True)),
        _rule("allow", "file-write-data", ['(literal "/dev/null")']),
        GPU_RULES if gpu else "",
        "(deny network*)",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def command(profile: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs `argv` under `profile`."""
    return [SANDBOX_EXEC, "-p", profile, *argv]
