"""The layout docs/architecture.md draws, checked on the source: no import circle,
no arrow up (the core imports no stage, a stage no other stage, nothing the command layer), and
each stage imports alone in a fresh interpreter.

The front door is the exception by definition: the package ``safeexport/__init__.py`` resolves
the public API (``from safeexport import compress``) from the command layer on first use, and
the ``__main__`` modules are entry points; nothing imports any of them."""

import ast
import shutil
import subprocess
import sys
from collections import defaultdict

import pytest

from tests.conftest import HANG_GUARD_S, REPO

CORE, STAGES, ABOVE = "safeexport", ("compressor", "exporters", "device_eval"), ("study",
                                                                                   "commands")
PACKAGES = (CORE, *STAGES, *ABOVE)
FRONT_DOORS = ("safeexport", "safeexport.__main__", "device_eval.__main__")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            parts = f.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = ast.parse(f.read_text(), str(f))
    return out


def _graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body (lazy imports included:
    an import inside a function is still an arrow)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else None

    edges = defaultdict(set)
    for m, tree in mods.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from pkg import sub`` imports the submodule when there is one
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                target = resolve(n)
                if target and target != m:
                    edges[m].add(target)
    return edges


def _layer(module: str) -> str:
    top = module.split(".")[0]
    return "core" if top == CORE else "stage" if top in STAGES else "above"


def test_no_arrow_points_up_or_across_stages():
    wrong = []
    for m, targets in _graph().items():
        if m in FRONT_DOORS:
            continue
        for t in targets:
            a, b = _layer(m), _layer(t)
            top_m, top_t = m.split(".")[0], t.split(".")[0]
            if (a == "core" and b != "core") or (a == "stage" and b == "above") or \
                    (a == "stage" and b == "stage" and top_m != top_t) or \
                    (t in FRONT_DOORS and top_m != "commands"):
                wrong.append(f"{m} -> {t}")
    assert not wrong, wrong


def test_no_import_circle():
    edges = {m: {t for t in ts if t not in FRONT_DOORS}
             for m, ts in _graph().items() if m not in FRONT_DOORS}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    assert not circles, circles


@pytest.mark.parametrize("stage", [*STAGES, "study"])
def test_each_stage_imports_alone(stage):
    """A fresh interpreter importing every module of a stage loads no other stage and nothing
    of the command layer (the study, above the stages, loads no command)."""
    others = ["commands"] if stage == "study" else [p for p in (*STAGES, *ABOVE) if p != stage]
    code = (f"import importlib, pkgutil, sys, {stage}\n"
            f"for m in pkgutil.walk_packages({stage}.__path__, '{stage}.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {others!r})\n"
            "print(','.join(bad))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"importing {stage} loaded {r.stdout.strip()}"


@pytest.mark.slow  # builds and installs a wheel (the fast tier's sibling: the imports above)
def test_a_plain_install_has_every_package_the_commands_need(tmp_path):
    """``pip install .`` (not editable) into a folder of its own: ``safeexport --help``, a
    command's help and ``python -m device_eval --help`` work from there, every package loaded
    from the installed copy, not the source tree (an editable install hides a package left out
    of the wheel)."""
    site, src = tmp_path / "site", tmp_path / "src"
    # built from a copy: setuptools builds in the source tree, which must stay as it is
    for name in (*PACKAGES, "pyproject.toml", "README.md"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(REPO / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--target", str(site), str(src)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    for args in ([str(site / "bin" / "safeexport"), "--help"],
                 [str(site / "bin" / "safeexport"), "evaluate", "--help"],
                 [sys.executable, "-m", "device_eval", "--help"]):
        r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=HANG_GUARD_S)
        assert r.returncode == 0 and "Usage:" in r.stdout, (args, r.stderr)
    code = ("import importlib, sys\n"
            f"for p in {PACKAGES!r} + ('commands.cli.evaluate', 'device_eval.__main__'):\n"
            "    importlib.import_module(p)\n"
            "mine = [m.__file__ for n, m in sys.modules.items()\n"
            f"        if n.split('.')[0] in {PACKAGES!r} and getattr(m, '__file__', None)]\n"
            f"print(len(mine), all(f.startswith({str(site)!r}) for f in mine))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr
    count, inside = r.stdout.split()
    assert int(count) > 20 and inside == "True", r.stdout
