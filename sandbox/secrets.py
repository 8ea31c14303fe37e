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
4. `redact(text)` replaces each known secret value, the user part of a URL (`https://user:token@host`
   becomes `https://***@host`), webhook URLs and anything shaped like a token (Anthropic, OpenAI,
   GitHub, GitLab, Slack, AWS, Hugging Face, Google, Stripe, npm, PyPI keys, JWTs, private key
   blocks, what follows `Authorization:`, `Bearer`, `token=`, `key=`, `password=`...) with
   `[redacted]`; rows, logs, run records, reports and everything shown to the agent go through it.

A process that was never re-executed (a library caller, a test calling `loop.main`) also counts the
secrets in its own environment (it cannot take them out of /proc/<pid>/environ anyway).

What a trainer or the harness inherits is not the loop's environment minus what looks secret but an
allow-list (`allowed_env`): PATH, locale, time zone, thread counts, device selection and the
libraries' tuning knobs, the project's own settings, and what the loop sets for the run (a private
HOME, TMPDIR and caches). A credential under a name nobody foresaw (`PIP_INDEX_URL=https://user:
token@...`, `SLACK_WEBHOOK=...`) is dropped like any other name not on the list.
"""

import json
import os
import re
import sys

__all__ = ["SECRET_NAME", "HANDOFF_ENV", "REDACTED", "ENV_NAMES", "ENV_PREFIXES", "is_secret_name", "without_secrets",
           "allowed_env", "isolate", "reexec_without_secrets", "receive", "remember", "get", "anthropic_credentials",
           "redact"]

# Variable names that hold credentials: taken out of the loop's own environment at start, and never passed
# to a trainer or the harness even where the allow-list below would let them through.
SECRET_NAME = re.compile(
    r"(_KEY$|_KEY_ID$|_TOKEN$|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_KEY|PRIVATE_KEY|_PAT$"
    r"|^SSH_AUTH_SOCK$|^ANTHROPIC_API_KEY$)", re.IGNORECASE)
HANDOFF_ENV = "AUTORESEARCH_SECRETS_FD"
REDACTED = "[redacted]"
MIN_REDACT_LEN = 8  # shorter values ("pw", "1") would blank out ordinary text; key-shaped strings are caught anyway
_ANTHROPIC_KEY = re.compile(r"sk-ant-[A-Za-z0-9_\-]+")

# The only variables of the loop's environment a trainer or the harness inherits (`allowed_env`).
ENV_NAMES = frozenset({
    "PATH", "LANG", "LANGUAGE", "TZ", "TERM", "NO_COLOR",
    # thread counts and how idle threads wait (Ray sets OMP_NUM_THREADS per worker)
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
    "BLIS_NUM_THREADS", "GOTO_NUM_THREADS", "TBB_NUM_THREADS", "OMP_WAIT_POLICY",
    # device selection (Ray sets CUDA_VISIBLE_DEVICES per worker); HSA_OVERRIDE_GFX_VERSION runs ROCm on
    # consumer AMD cards
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
    "GPU_DEVICE_ORDINAL", "HSA_OVERRIDE_GFX_VERSION",
    # where libraries and compilers are (README: OpenBLAS preloaded under MLX); Triton and Inductor call CC/CXX
    "LD_LIBRARY_PATH", "LD_PRELOAD", "CC", "CXX",
    # the project's settings a trainer or the harness reads (the loop sets protocol, backend, cache itself)
    "AUTORESEARCH_PROTOCOL", "AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_BACKEND", "AUTORESEARCH_CACHE",
    "AUTORESEARCH_CPU_BF16", "AUTORESEARCH_ATTENTION",
})
# ... and these families: locale; OpenMP, MKL and OpenBLAS settings (OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are
# needed on some CPUs); the tuning knobs of PyTorch, Inductor, Triton, MLX, CUDA and ROCm.
ENV_PREFIXES = ("LC_", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "PYTORCH_", "TORCH_", "TORCHINDUCTOR_",
                "TRITON_", "MLX_", "CUDA_", "HIP_", "HSA_", "ROCR_", "MIOPEN_")

# Shapes of credentials, whoever's: (pattern, replacement, words one of which the text holds for the pattern
# to be tried: a cheap test first, as logs run to megabytes). Known values are redacted before.
_URL_USERINFO = re.compile(r"://[^\s/?#@\"'<>\\]+@")  # (starting at "://": the scheme stays, and it is fast)
_WEBHOOK = re.compile(r"(https?://(?:hooks\.slack\.com/(?:services|workflows|triggers)/"
                      r"|(?:[a-z]+\.)?discord(?:app)?\.com/api/webhooks/))[^\s\"'<>]+")
_AUTH_HEADER = re.compile(r"(?i)\b((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token|digest)\s+)?)"
                          r"[^\s\"',;]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{12,}")
_KEY_WORDS = ("token", "key", "secret", "password", "passwd", "pwd", "auth", "sig", "credential")
_KEY_VALUE = re.compile(  # `access_token=...`, `"api_key": "..."`, `password: ...`: the value, if 8+ characters
    r"(?i)(?<![a-z0-9])((?:token|key|secret|password|passwd|pwd|apikey|auth|sig|signature|credentials?)"
    r"(?![a-z0-9])[\"']?\s*[:=]\s*[\"']?)(?=[^\s\"'&,;()\[\]{}<>]*[a-z])[^\s\"'&,;()\[\]{}<>]{8,}")
_TOKEN = re.compile(r"(?<![A-Za-z0-9_-])(?:" + "|".join([
    r"sk-ant-[A-Za-z0-9_-]+",  # Anthropic
    r"sk-[A-Za-z0-9_-]{20,}",  # OpenAI and others
    r"gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}",  # GitHub
    r"glpat-[A-Za-z0-9_-]{20,}",  # GitLab
    r"(?:xox[abposre]|xapp)-[A-Za-z0-9-]{10,}",  # Slack
    r"(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])",  # AWS access key ids
    r"hf_[A-Za-z0-9]{20,}",  # Hugging Face
    r"AIza[0-9A-Za-z_-]{35}",  # Google
    r"[rsp]k_(?:live|test)_[A-Za-z0-9]{16,}",  # Stripe
    r"npm_[A-Za-z0-9]{36}",  # npm
    r"pypi-[A-Za-z0-9_-]{40,}",  # PyPI
    r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT
]) + ")")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)")
_SHAPES: tuple[tuple[re.Pattern, str, tuple[str, ...] | None], ...] = (  # words: looked for in the lower-cased text
    (_URL_USERINFO, "://***@", ("://",)),
    (_WEBHOOK, r"\1" + "[redacted]", ("hooks.slack.com", "discord")),
    (_AUTH_HEADER, r"\1" + "[redacted]", ("authorization",)),
    (_BEARER, r"\1" + "[redacted]", ("bearer",)),
    (_PRIVATE_KEY, "[redacted]", ("private key-----",)),
    (_TOKEN, "[redacted]", None),
    (_KEY_VALUE, r"\1" + "[redacted]", _KEY_WORDS),
)
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


def allowed_env(base=None, **extra: str) -> dict[str, str]:
    """The environment of a run of agent code or of the harness: of `base` (default this process's environment)
    only the names on the allow-list (ENV_NAMES, ENV_PREFIXES) that do not look like credentials, then
    `extra` (what the loop sets for the run: a private HOME, TMPDIR, caches, the hand-over directory)."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if (k in ENV_NAMES or k.startswith(ENV_PREFIXES)) and not is_secret_name(k)}
    env.update(extra)
    return env


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
    from sandbox.pyexec import python_argv

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
    """`text` with every known secret value (at least MIN_REDACT_LEN characters long), the user part of every
    URL (`scheme://***@host`), webhook URLs and every string shaped like a token or a credential (see _SHAPES)
    replaced."""
    global _cache
    if not text:
        return text
    values = _values()
    if values is not _cache[0]:
        known = sorted({v for v in values.values() if len(v) >= MIN_REDACT_LEN}, key=lambda v: (-len(v), v))
        _cache = (values, re.compile("|".join([*map(re.escape, known), _ANTHROPIC_KEY.pattern])))
    text = _cache[1].sub(REDACTED, text)
    low = text.lower()
    for pattern, replacement, words in _SHAPES:
        if words is None or any(w in low for w in words):
            text = pattern.sub(replacement, text)
    return text
