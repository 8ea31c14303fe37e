"""The user's secrets (API keys, tokens, passwords in the environment): kept out of every environment
and command line the trainer can see, handed to the agent client in memory, scrubbed from what the
loop writes.

How they travel:

1. `python loop.py ...` starts and calls `isolate()` first. Every variable whose name looks like a
   credential (`SECRET_NAME`) is taken out of the environment and written to a pipe; the loop then
   replaces itself (same pid, `os.execve`) with `python -I loop.py ...` whose environment holds no
   secret, only the pipe's descriptor number in AUTORESEARCH_SECRETS_FD. From then on
   /proc/<pid>/environ and `ps eww` of the loop show no secret, and nothing it starts inherits one.
2. The re-executed loop's `isolate()` reads the pipe to its end, closes it and keeps the values in
   this module's memory only.
3. The claude agent gets its key from `anthropic_credentials()` (passed to `anthropic.Anthropic(...)`
   explicitly); nothing reads it from os.environ.
4. `redact(text)` replaces each known secret value and anything shaped like an Anthropic key with
   `[redacted]`; rows, logs, run records and reports go through it before they are written.

A process that was never re-executed (a library caller, a test calling `loop.main`) also counts the
secrets in its own environment (it cannot take them out of /proc/<pid>/environ anyway).
"""

import json
import os
import re
import sys

__all__ = ["SECRET_NAME", "HANDOFF_ENV", "REDACTED", "is_secret_name", "without_secrets", "isolate",
           "reexec_without_secrets", "receive", "remember", "get", "anthropic_credentials", "redact"]

# Variable names that hold credentials (also what guards.child_env keeps from the trainer).
SECRET_NAME = re.compile(
    r"(_KEY$|_KEY_ID$|_TOKEN$|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_KEY|PRIVATE_KEY|_PAT$"
    r"|^SSH_AUTH_SOCK$|^ANTHROPIC_API_KEY$)", re.IGNORECASE)
HANDOFF_ENV = "AUTORESEARCH_SECRETS_FD"
REDACTED = "[redacted]"
MIN_REDACT_LEN = 8  # shorter values ("pw", "1") would blank out ordinary text; key-shaped strings are caught anyway
_ANTHROPIC_KEY = re.compile(r"sk-ant-[A-Za-z0-9_\-]+")
_PIPE_SAFE = 8192  # a payload this small fits a pipe's buffer on every platform (macOS starts at 16 KiB)

_store: dict[str, str] = {}  # secrets handed over or remembered; in this process's memory only
_handed_over = False  # True in a process started by reexec_without_secrets: the store is then all there is
_cache: tuple[dict | None, re.Pattern] = (None, _ANTHROPIC_KEY)  # (the values it was built from, pattern)
_env_cache: tuple[tuple, dict[str, str]] = ((), {})


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def without_secrets(env) -> dict[str, str]:
    """`env` (a mapping) without the variables whose names look like credentials."""
    return {k: v for k, v in env.items() if not is_secret_name(k)}


def _secrets_in(env) -> dict[str, str]:
    return {k: v for k, v in env.items() if is_secret_name(k) and v}


def isolate(script: str, argv: list[str]) -> None:
    """First call of a locked entry point run as a script (loop.py): in the re-executed process, take
    the secrets handed over; in the first one, re-execute without them (does not return then)."""
    if not receive():
        reexec_without_secrets(script, argv)


def reexec_without_secrets(script: str, argv: list[str]) -> None:
    """Replace this process with `python -I script argv...` (same pid) whose environment holds no secret;
    the secrets follow through an inherited pipe (see `receive`). A secret in an argument is replaced by
    `[redacted]`. Returns only when there is nothing to do: the process already runs isolated and its
    environment holds no secret."""
    from research.pyexec import python_argv

    env = dict(os.environ)
    found = _secrets_in(env)
    clean = without_secrets(env)
    clean.pop(HANDOFF_ENV, None)
    if not found and sys.flags.isolated and len(clean) == len(env):
        return
    if found:
        payload = json.dumps(found).encode("utf-8")
        if len(payload) <= _PIPE_SAFE:
            fd, w = os.pipe()
            os.write(w, payload)
            os.close(w)
        else:  # too big for a pipe nobody reads yet: an unlinked file only this process can reach
            import tempfile

            f = tempfile.TemporaryFile()
            f.write(payload)
            f.flush()
            fd = os.dup(f.fileno())
            os.lseek(fd, 0, os.SEEK_SET)
            f.close()
        os.set_inheritable(fd, True)
        clean[HANDOFF_ENV] = str(fd)
    remember(found)
    cmd = python_argv([script, *(redact(a) for a in argv)])  # a key typed into an argument stays out too
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    try:
        os.execve(cmd[0], cmd, clean)
    except OSError as e:
        raise SystemExit(f"error: could not restart {os.path.basename(script)} without the credentials in its "
                         f"environment ({cmd[0]}: {e.strerror or e}).") from None


def receive() -> bool:
    """In a process started by `reexec_without_secrets`: read the secrets from the inherited descriptor,
    close it, drop its number from the environment. False if this process was not started that way."""
    global _handed_over
    number = os.environ.pop(HANDOFF_ENV, None)
    if number is None:
        return False
    try:
        fd = int(number)
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(fd)
        values = json.loads(b"".join(chunks).decode("utf-8"))
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: the credentials handed to this process could not be read ({e}).") from None
    if not isinstance(values, dict):
        raise SystemExit("error: the credentials handed to this process could not be read.")
    remember({str(k): str(v) for k, v in values.items()})
    _handed_over = True
    return True


def remember(values: dict[str, str]) -> None:
    """Add secrets to the in-memory store (they are then also redacted)."""
    global _store
    _store = {**_store, **{k: v for k, v in values.items() if v}}  # a new dict: redact() sees the change


def _values() -> dict[str, str]:
    """The secrets this process knows: the store, plus, in a process that was never re-executed (a
    library caller, a test running loop.main), those in its own environment."""
    global _env_cache
    if _handed_over:
        return _store
    raw = getattr(os.environ, "_data", None)
    seen = (tuple(raw.items()) if isinstance(raw, dict) else tuple(os.environ.items()), tuple(_store.items()))
    if seen != _env_cache[0]:  # rebuilt only when the environment or the store changed
        _env_cache = (seen, {**_secrets_in(os.environ), **_store})
    return _env_cache[1]


def get(name: str) -> str | None:
    return _values().get(name)


def anthropic_credentials() -> dict[str, str]:
    """Keyword arguments for `anthropic.Anthropic(...)`: api_key and/or auth_token; {} when there are none."""
    creds = {}
    if get("ANTHROPIC_API_KEY"):
        creds["api_key"] = get("ANTHROPIC_API_KEY")
    if get("ANTHROPIC_AUTH_TOKEN"):
        creds["auth_token"] = get("ANTHROPIC_AUTH_TOKEN")
    return creds


def redact(text: str) -> str:
    """`text` with every known secret value (at least MIN_REDACT_LEN characters long) and every string
    shaped like an Anthropic key (`sk-ant-...`) replaced by `[redacted]`."""
    global _cache
    if not text:
        return text
    values = _values()
    if values is not _cache[0]:
        known = sorted({v for v in values.values() if len(v) >= MIN_REDACT_LEN}, key=lambda v: (-len(v), v))
        _cache = (values, re.compile("|".join([*map(re.escape, known), _ANTHROPIC_KEY.pattern])))
    return _cache[1].sub(REDACTED, text)
