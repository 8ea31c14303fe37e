"""The import rules of docs/ARCHITECTURE.md, checked on every import of the product code (also those
inside functions): each package imports only the packages below it, and no module imports another
package's underscore names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("data", "model", "backends", "judge", "sandbox", "prepare", "research", "agents", "reporting")
# what each may import besides itself (docs/ARCHITECTURE.md's table)
ALLOWED = {
    "data": set(),
    "model": set(),
    "backends": {"data", "model"},
    "judge": {"data", "backends"},
    "sandbox": {"data", "backends", "judge"},
    "prepare": {"data", "backends", "judge", "sandbox"},
    "research": {"data", "model", "backends", "judge", "sandbox", "prepare"},
    "agents": {"data", "model", "backends", "judge", "sandbox", "prepare", "research"},
    "reporting": {"data", "model", "backends", "judge", "sandbox", "prepare", "research"},
    "trainer": {"prepare", "backends", "model"},
}
COMMANDS = {"loop.py", "backends/__main__.py"}  # entry points: may import anything


def owner(path: Path, root: Path = REPO) -> str:
    rel = path.relative_to(root)
    if rel.name in ("train_cuda.py", "train_mlx.py"):
        return "trainer"
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def product_files(root: Path = REPO) -> list[Path]:
    files = [root / f for f in ("prepare.py", "train_cuda.py", "train_mlx.py") if (root / f).exists()]
    for pkg in PACKAGES:
        files += sorted((root / pkg).glob("*.py")) if (root / pkg).is_dir() else []
    return [f for f in files if str(f.relative_to(root)) not in COMMANDS]


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every absolute import in `path`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [a.name for a in node.names], node.lineno))
    return out


def layering_violations(root: Path = REPO) -> list[str]:
    wrong = []
    for f in product_files(root):
        mine = owner(f, root)
        for module, _, line in imports(f):
            top = module.split(".")[0]
            if top in PACKAGES and top != mine and top not in ALLOWED[mine]:
                wrong.append(f"{f.relative_to(root)}:{line} ({mine}) imports {module}")
    return wrong


def private_imports(root: Path = REPO) -> list[str]:
    wrong = []
    for f in [*product_files(root), *(root / c for c in COMMANDS if (root / c).exists())]:
        for module, names, line in imports(f):
            if module.split(".")[0] in PACKAGES:
                wrong += [f"{f.relative_to(root)}:{line} imports {module}.{n}" for n in names if n.startswith("_")]
    return wrong


def test_each_package_imports_only_those_below_it():
    wrong = layering_violations()
    assert not wrong, "\n".join(wrong)


def test_the_table_has_no_cycles_and_matches_the_document():
    order = []
    pending = dict(ALLOWED)
    while pending:
        ready = [p for p, deps in pending.items() if deps <= set(order)]
        assert ready, f"a cycle among {sorted(pending)}"
        order += sorted(ready)
        for p in ready:
            del pending[p]
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for pkg in PACKAGES:
        assert re.search(rf"^\| `{pkg}(/|\.py)`", doc, flags=re.M), pkg


def test_no_module_imports_another_packages_underscore_names():
    wrong = private_imports()
    assert not wrong, "\n".join(wrong)


def test_the_rules_catch_a_violation(tmp_path):
    """The checks are not vacuous: a judge module importing the loop's private name, or a sandbox module
    importing the loop, is caught; the same imports one layer up are allowed."""
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "bad.py").write_text("def f():\n    from research.results import _private\n")
    (tmp_path / "sandbox").mkdir()
    (tmp_path / "sandbox" / "bad.py").write_text("import research.session\nfrom judge import entry\n")
    (tmp_path / "research").mkdir()
    (tmp_path / "research" / "fine.py").write_text("from sandbox import runner\nfrom judge.entry import REPO\n")
    assert sorted(layering_violations(tmp_path)) == ["judge/bad.py:2 (judge) imports research.results",
                                                     "sandbox/bad.py:1 (sandbox) imports research.session"]
    assert private_imports(tmp_path) == ["judge/bad.py:2 imports research.results._private"]


TRAINER_NAME_LIMIT = 10  # the reference's train.py imports 5 names; ours adds the device runtime and the loop's lines


def locked_names(path: Path, root: Path = REPO) -> set[str]:
    """The names of locked code a trainer uses: what it imports by name from prepare/backends/model, and every
    attribute it reads of a locked module it imports (`prepare.log_step`, `torch_rt.Runtime`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules: dict[str, str] = {}  # local name -> the locked module it stands for
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ("prepare", "backends", "model"):
                    modules[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("prepare", "backends",
                                                                                                "model"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if (root / (full.replace(".", "/") + ".py")).exists():
                    modules[a.asname or a.name] = full
                else:
                    names.add(full)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            names.add(f"{modules[node.value.id]}.{node.attr}")
    return names


def test_each_trainer_uses_at_most_ten_names_of_locked_code():
    """The trainer is the agent's research surface: what it must know of locked code is the device runtime, the
    protocol and dataloader, the clock, the lines the loop reads and the hand-over."""
    for trainer in ("train_cuda.py", "train_mlx.py"):
        used = locked_names(REPO / trainer)
        assert len(used) <= TRAINER_NAME_LIMIT, f"{trainer}: {sorted(used)}"
    common = {n for n in locked_names(REPO / "train_cuda.py") if "torch_rt" not in n}
    assert common == {n for n in locked_names(REPO / "train_mlx.py") if "mlx_rt" not in n}


def test_the_name_count_sees_every_way_of_reaching_locked_code(tmp_path):
    (tmp_path / "backends").mkdir()
    (tmp_path / "backends" / "torch_rt.py").write_text("")
    (tmp_path / "t.py").write_text("import prepare\nimport backends as b\nfrom backends import torch_rt\n"
                                   "from model import count_params\nprepare.fail('x')\nb.detect()\n"
                                   "torch_rt.seed_all(1)\ntorch_rt.seed_all(2)\n")
    assert locked_names(tmp_path / "t.py", tmp_path) == {"prepare.fail", "backends.detect",
                                                         "backends.torch_rt.seed_all", "model.count_params"}
