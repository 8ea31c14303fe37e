"""Landlock launcher: confine this process, then become the trainer (Linux, no privileges needed).

    python -I sandbox/landlock.py POLICY_JSON -- PROGRAM [ARGS...]

`sandbox.confine.wrap("landlock", ...)` builds that command line; nothing else should. The policy
travels as one argument: it is read before the program exists, so the program cannot alter it,
and once `execv` replaces this process, `/proc/<pid>/cmdline` shows only the program's own
arguments. `-I` keeps the environment and the working tree out of this launcher's imports; the
file imports nothing but the standard library.

POLICY_JSON is an object:
    rules      [[path, kind], ...]  kind: "ro" read, "rx" read+execute, "rw" read+write+create
                                    (no execute), "dev" read/write/ioctl of a device node,
                                    "list" list a directory's names (not read its files)
    proc_self  true                 grant read access to this process's own /proc/<pid>
    cwd        path                 working directory of the program
    rlimits    {"CORE": 0, "AS": n, "NPROC": n}

In order, the launcher: sets the rlimits; asks for SIGKILL when its parent dies (so a loop that
dies takes the run with it; this survives `execv`); sets PR_SET_NO_NEW_PRIVS; restricts itself
with a Landlock ruleset at the best ABI the kernel offers (filesystem rules; ABI >= 4 also
denies every TCP bind and connect; ABI >= 6 also keeps signals and abstract unix sockets inside
the domain); installs a seccomp filter that refuses socket(2) for every address family (UDP and
pathname unix sockets, such as an ssh-agent or a docker socket, are outside what Landlock
covers), io_uring (it can open sockets without socket(2)), the kernel keyring calls (the
keyring is the user's, shared with the session) and System V IPC objects (shmget, msgget, semget:
without an IPC namespace they outlive the run, holding RAM no limit of the run counts); changes
directory; and execs the program. Anything that fails ends the launcher with status 126 before the program starts: a run never
goes ahead half-confined.

Landlock also forbids ptrace, and so reading /proc/<pid>/environ or /mem, of any process outside
the domain, whatever /proc rules say. It cannot hide that paths exist (stat is not mediated) and
cannot end processes; see sandbox/confine.py for what the caller does about that.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import struct
import sys

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446  # same on every 64-bit arch
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1

FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
FS_MAKE_SYM, FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 12, 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

# Rights a rule on a single file may carry; the kernel rejects directory-only rights there.
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
READ = FS_READ_FILE | FS_READ_DIR
ACCESS = {
    "ro": READ,
    "rx": READ | FS_EXECUTE,
    "rw": READ | FS_WRITE_FILE | FS_TRUNCATE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR
    | FS_MAKE_REG | FS_MAKE_SOCK | FS_MAKE_FIFO | FS_MAKE_SYM | FS_REFER,
    # O_TRUNC on /dev/null (Python's open(os.devnull, "w")) needs TRUNCATE as well as WRITE_FILE.
    "dev": FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE | FS_IOCTL_DEV,
    "list": FS_READ_DIR,
}

PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
EXIT_NOT_CONFINED = 126

_libc = ctypes.CDLL(None, use_errno=True)


class LaunchError(Exception):
    """The policy could not be applied; the program must not start."""


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise LaunchError(f"{what}: {os.strerror(err)}")
    return result


def _arg(value: int | ctypes.Array | None) -> ctypes.c_void_p | ctypes.Array | ctypes.c_long:
    if value is None:
        return ctypes.c_void_p(None)
    return value if isinstance(value, ctypes.Array) else ctypes.c_long(value)


def _syscall(nr: int, *args: int | ctypes.Array | None) -> int:
    return _libc.syscall(ctypes.c_long(nr), *map(_arg, args))


def abi_version() -> int:
    """The Landlock ABI this kernel offers, 0 when it has none (or it is disabled at boot)."""
    if not sys.platform.startswith("linux"):
        return 0
    return max(_syscall(SYS_CREATE_RULESET, None, 0, CREATE_RULESET_VERSION), 0)


def handled_fs(abi: int) -> int:
    """Every filesystem right this ABI knows: whatever no rule grants is then denied."""
    mask = (1 << 13) - 1
    if abi >= 2:
        mask |= FS_REFER
    if abi >= 3:
        mask |= FS_TRUNCATE
    if abi >= 5:
        mask |= FS_IOCTL_DEV
    return mask


def _create_ruleset(abi: int) -> int:
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    # The 24-byte layout works on every ABI: an older kernel accepts trailing fields that are zero.
    attr = ctypes.create_string_buffer(struct.pack("=QQQ", handled_fs(abi), net, scoped), 24)
    return _check(_syscall(SYS_CREATE_RULESET, attr, 24, 0), "landlock_create_ruleset")


def _add_rule(ruleset: int, fd: int, access: int) -> None:
    attr = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)
    _check(_syscall(SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, attr, 0), "landlock_add_rule")


def _add_path(ruleset: int, path: str, kind: str, handled: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # optional system paths; sandbox.confine already insisted on the policy's own
    try:
        access = ACCESS[kind] & handled
        if not os.path.isdir(f"/proc/self/fd/{fd}"):
            access &= FILE_RIGHTS
        if access:
            _add_rule(ruleset, fd, access)
    finally:
        os.close(fd)


def _pin_proc_self(ruleset: int, handled: int) -> int:
    """Grant this process's /proc/<pid> (the pid survives execv) and keep it open.

    /proc/self is a magic link: opening it yields this process's own /proc/<pid> directory,
    so children of the program get no such grant. The descriptor stays open (inheritable) so
    the kernel cannot drop that directory's inode, which holds the rule, and build a new one.
    """
    fd = os.open("/proc/self", os.O_PATH | os.O_DIRECTORY)
    os.set_inheritable(fd, True)
    _add_rule(ruleset, fd, READ & handled)
    return fd


def _set_rlimits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        which = getattr(resource, f"RLIMIT_{name}")
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))


def _prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0)), f"prctl({option})")


# --- seccomp: classic BPF, assembled from (op, k, true-label, false-label) with named jumps ---

# Per machine: audit arch id, socket(2), add_key/request_key/keyctl (the kernel keyring is shared
# with the user's session and may hold credentials), and shmget/semget/msgget (System V objects
# outlive the process that made them: a segment would keep its RAM after the run).
_AUDIT_ARCH = {"x86_64": (0xC000003E, 41, (248, 249, 250), (29, 64, 68)),
               "aarch64": (0xC00000B7, 198, (217, 218, 219), (194, 190, 186))}
_IO_URING = (425, 426, 427)  # setup, enter, register: one number on every arch
_X32_BIT = 0x40000000
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_LD_ABS, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06


def seccomp_program(machine: str) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions; raises LaunchError on an unknown machine."""
    if machine not in _AUDIT_ARCH:
        raise LaunchError(f"no seccomp filter for {machine}")
    arch, socket_nr, keyring, sysv_ipc = _AUDIT_ARCH[machine]
    errno_eacces, errno_enosys, errno_eperm = 13, 38, 1
    src: list[tuple] = [
        (_LD_ABS, 4), (_JEQ, arch, "native", "foreign"),
        ("native",), (_LD_ABS, 0),
        *([(_JGE, _X32_BIT, "foreign", None)] if machine == "x86_64" else []),
        (_JEQ, socket_nr, "no_socket", None),
        *[(_JEQ, nr, "no_uring", None) for nr in _IO_URING],
        *[(_JEQ, nr, "foreign", None) for nr in (*keyring, *sysv_ipc)],
        (_RET, _RET_ALLOW),
        ("foreign",), (_RET, _RET_ERRNO | errno_eperm),  # also the keyring and System V IPC calls
        ("no_socket",), (_RET, _RET_ERRNO | errno_eacces),
        ("no_uring",), (_RET, _RET_ERRNO | errno_enosys),
    ]
    labels, n = {}, 0
    for item in src:
        if len(item) == 1:
            labels[item[0]] = n
        else:
            n += 1
    out, i = [], 0
    for item in src:
        if len(item) == 1:
            continue
        code, k, *jumps = item
        jt, jf = ((labels[j] - i - 1) if j else 0 for j in (jumps + [None, None])[:2])
        out.append((code, jt, jf, k))
        i += 1
    return out


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _install_seccomp() -> None:
    program = seccomp_program(os.uname().machine)
    raw = b"".join(struct.pack("=HBBI", code, jt, jf, k) for code, jt, jf, k in program)
    buf = ctypes.create_string_buffer(raw, len(raw))
    prog = _SockFprog(len(program), ctypes.addressof(buf))
    _check(_libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(prog),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)), "seccomp")


PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> None:
    """No capability survives into the trainer, even when the loop runs as root: the bounding set is
    emptied (so nothing can be regained on exec), the ambient set cleared, and the effective,
    permitted and inheritable sets zeroed. Root without capabilities is an ordinary file owner."""
    cap = 0
    while _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)) == 0:
        cap += 1  # fails with EINVAL past the kernel's last capability
    if cap == 0 and os.geteuid() == 0:
        raise LaunchError("could not empty the capability bounding set")
    _libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), ctypes.c_ulong(0), ctypes.c_ulong(0),
                ctypes.c_ulong(0))
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def confine(policy: dict) -> None:
    """Apply `policy` to this process (see the module docstring); raises LaunchError."""
    abi = abi_version()
    if abi < 1:
        raise LaunchError("this kernel offers no Landlock")
    _set_rlimits(policy.get("rlimits", {}))
    _prctl(PR_SET_PDEATHSIG, 9)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    handled = handled_fs(abi)
    ruleset = _create_ruleset(abi)
    try:
        for path, kind in policy["rules"]:
            _add_path(ruleset, path, kind, handled)
        if policy.get("proc_self"):
            _pin_proc_self(ruleset, handled)
        _check(_syscall(SYS_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    _drop_capabilities()
    _install_seccomp()
    os.chdir(policy["cwd"])


def main(args: list[str]) -> None:
    if len(args) < 3 or args[1] != "--":
        print("usage: landlock.py POLICY_JSON -- PROGRAM [ARGS...]", file=sys.stderr)
        sys.exit(2)
    try:
        confine(json.loads(args[0]))
    except (LaunchError, OSError, ValueError, KeyError) as e:
        print(f"sandbox: Landlock could not be applied, the run did not start: {e}", file=sys.stderr)
        sys.exit(EXIT_NOT_CONFINED)
    program = args[2:]
    try:
        os.execvp(program[0], program)
    except OSError as e:
        print(f"sandbox: cannot run {program[0]}: {e}", file=sys.stderr)
        sys.exit(EXIT_NOT_CONFINED)


if __name__ == "__main__":
    main(sys.argv[1:])
