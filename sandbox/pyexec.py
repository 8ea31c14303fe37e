"""Start Python so that nothing in the work tree steers it.

Every Python process the loop starts runs with `-I` (`python_argv`): no script directory and no
current directory on sys.path, PYTHON* variables and the user's site directory ignored. A script
started that way finds the repository's own packages through `bootstrap(root)`:

- the repository root goes to the END of sys.path, so the standard library and the installed
  packages come first: a `json.py`, `subprocess.py` or `numpy.py` in the tree is never imported
  in their place;
- modules under the root are compiled from their source every time: a byte-code file in a
  `__pycache__` folder or an extension module (`session.cpython-311-x86_64-linux-gnu.so`) planted
  beside a locked module is never loaded instead of it, and a module file next to a package folder
  of the same name is an import error, not a choice.

A locked script (loop.py, a harness) starts like this, before any other import (`os` and `sys` are
loaded by the interpreter itself, so importing them reads nothing from the tree; no `from __future__`
import, which is a module import too):

    import os
    import sys

    if __name__ == "__main__":
        _boot = os.path.join(os.path.dirname(os.path.realpath(__file__)), "sandbox", "pyexec.py")
        with open(_boot, "rb") as _f:
            exec(compile(_f.read(), _boot, "exec"), {"__name__": "__pyexec_boot__", "__file__": _boot,
                                                      "SCRIPT": __file__})

(in a script one folder down, e.g. judge/harness.py, the path is `dirname(dirname(...))`). It reads
this file by path (never through the import system), drops the script's own folder from the front of
sys.path and calls `bootstrap()`. Code that is not locked (the trainer) is started through this file
as a launcher: `script_argv(trainer, root=repo)`. `-c` code gets `preamble(root)` in front.
"""

import os
import sys


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _real(path: str) -> str:
    return os.path.realpath(path or os.getcwd())


def _drop_script_dir(script: str | None) -> None:
    """`python script.py` (without -I/-P) put the script's folder first on sys.path: take it out."""
    if script and not sys.flags.safe_path and sys.path:
        if _real(sys.path[0]) == os.path.dirname(_real(script)):
            del sys.path[0]


if __name__ == "__pyexec_boot__":  # exec'd by a locked script's first lines: before importing anything else
    _drop_script_dir(globals().get("SCRIPT"))
elif __name__ == "__main__":  # the launcher: `python -I sandbox/pyexec.py [--root DIR] SCRIPT ARGS...`
    _drop_script_dir(__file__)

from importlib.machinery import FileFinder, SourceFileLoader  # noqa: E402

__all__ = ["ROOT", "python_argv", "script_argv", "preamble", "bootstrap", "interpreter_flags"]

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # the repository this file belongs to


def interpreter_flags() -> list[str]:
    """This interpreter's own options that a child should share (-B, -O, -W, -X), besides -I."""
    flags = []
    if sys.dont_write_bytecode:
        flags.append("-B")
    flags += ["-O"] * sys.flags.optimize
    flags += [f"-W{w}" for w in sys.warnoptions]
    for key, value in getattr(sys, "_xoptions", {}).items():
        flags.append(f"-X{key}" if value is True else f"-X{key}={value}")
    return flags


def python_argv(args, *, unbuffered: bool = False) -> list[str]:
    """The command line of a Python process the loop starts: `[sys.executable, "-I", <flags>, *args]`,
    where `args` is a script and its arguments, `-m module ...` or `-c code ...`.

    Under -I the child ignores PYTHON* variables (PYTHONUNBUFFERED among them: pass unbuffered=True
    for `-u`) and does not see the script's folder: a locked script bootstraps itself (see the module
    docstring), anything else goes through `script_argv`."""
    if not sys.executable:
        raise RuntimeError("this Python does not know its own executable (sys.executable is empty)")
    return [sys.executable, "-I", *interpreter_flags(), *(["-u"] if unbuffered else []), *map(str, args)]


def script_argv(script, *args, root=None, unbuffered: bool = False) -> list[str]:
    """Run any Python file as `__main__` (the trainer, say) with -I, the packages of `root` (default:
    this repository) importable from source at the end of sys.path, through this file as launcher."""
    launcher = os.path.realpath(__file__)
    return python_argv([launcher, "--root", str(root or ROOT), str(script), *map(str, args)], unbuffered=unbuffered)


def preamble(root=None) -> str:
    """Python source to put in front of `-c` code run with python_argv: bootstraps `root` (default: this
    repository) from this file, read by path."""
    boot = os.path.realpath(__file__)
    return (f"exec(compile(open({boot!r}, 'rb').read(), {boot!r}, 'exec'), "
            f"{{'__name__': '__pyexec_boot__', '__file__': {boot!r}, 'BOOT_ROOT': {str(root or ROOT)!r}}})\n")


class _SourceOnlyLoader(SourceFileLoader):
    """Compiles the module from its source each time: no byte-code file is read (or written)."""

    def path_stats(self, path):
        raise OSError("byte-code is not used for the repository's own modules")


class _TreeFinder(FileFinder):
    """A FileFinder for folders of the repository: `.py` sources only; a module file beside a package
    folder of the same name is refused (one of the two was planted to be imported instead)."""

    def __init__(self, path: str):
        super().__init__(path, (_SourceOnlyLoader, [".py"]))

    def find_spec(self, fullname, target=None):
        base = os.path.join(self.path or os.getcwd(), fullname.rpartition(".")[2])
        if os.path.isfile(base + ".py") and os.path.isfile(os.path.join(base, "__init__.py")):
            raise ImportError(f"both {base}.py and the package {base}{os.sep} exist; one of them was put there to "
                              "be imported instead of the other: remove it", name=fullname)
        return super().find_spec(fullname, target)


def _not_tree() -> list[str]:
    """Folders under a repository that are the Python installation (a .venv inside it), not its code."""
    out = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    out.update(p for p in sys.path if "site-packages" in p or "dist-packages" in p)
    return [_real(p) for p in out if p]


def bootstrap(root=None) -> None:
    """Make the repository at `root` (default: this file's) importable the safe way: every sys.path entry
    inside it removed, the root appended at the end, its folders imported from source only."""
    root = _real(str(root or ROOT))
    installed = _not_tree()

    def in_tree(path: str) -> bool:
        p = _real(path)
        return _inside(p, root) and not any(_inside(p, x) for x in installed)

    def hook(path: str):
        if in_tree(path) and os.path.isdir(path or os.getcwd()):
            return _TreeFinder(path)
        raise ImportError("not a folder of the repository")

    hook.autoresearch_root = root
    if not any(getattr(h, "autoresearch_root", None) == root for h in sys.path_hooks):
        sys.path_hooks.insert(0, hook)
    sys.path[:] = [p for p in sys.path if not in_tree(p)] + [root]
    sys.path_importer_cache.clear()


def _launch(argv: list[str]) -> None:
    root = None
    if argv[:1] == ["--root"]:
        root, argv = argv[1], argv[2:]
    if not argv:
        raise SystemExit("usage: python -I sandbox/pyexec.py [--root DIR] SCRIPT [ARGS...]")
    bootstrap(root)
    import runpy

    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__pyexec_boot__":
    bootstrap(globals().get("BOOT_ROOT"))
elif __name__ == "__main__":
    _launch(sys.argv[1:])
