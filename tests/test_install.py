"""The installed project: one import name (`llama_erc`) that no other distribution provides, the HF references and
every module of ours importable in one process, a wheel holding only the package, console scripts that run
from any directory, and imports that run one way between the rooms (no cycles, no private names across rooms).

These are what a new day's package versions broke once: transformers 5.25 started importing Hugging Face's
`kernels` distribution, and the project's old top-level `kernels/` package shadowed it."""
from __future__ import annotations

import ast
import importlib.metadata
import os
import pkgutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

DIST = "llama-lora-erc"
ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llama_erc"
# Which rooms each room may import (STYLE.md section 2): lower layers only.
ALLOWED = {"kernels": set(), "model": {"kernels"}, "data": set(), "engine": {"kernels", "model", "data"},
           "benchmarks": {"kernels", "model", "data", "engine", "demo"}, "demo": {"kernels", "model", "data", "engine"}}


def _installed() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{DIST} is not installed (pip install -e .)")


def import_clashes(packages: dict[str, list[str]], ours: str) -> dict[str, list[str]]:
    """{import name: the other distributions providing it} for every top-level name `ours` installs, from an
    importlib.metadata.packages_distributions() mapping."""
    return {name: sorted(set(dists) - {ours}) for name, dists in packages.items()
            if ours in dists and set(dists) - {ours}}


def test_import_clashes_are_found():
    """The check itself, on the mapping of the old layout next to transformers 5.25 (both provide `kernels`)."""
    old = {"kernels": [DIST, "kernels"], "engine": [DIST, DIST], "torch": ["torch"]}
    assert import_clashes(old, DIST) == {"kernels": ["kernels"]}
    assert import_clashes({"llama_erc": [DIST]}, DIST) == {}


def test_no_installed_import_name_is_shared_with_another_distribution():
    dist = _installed()
    packages = importlib.metadata.packages_distributions()
    clashes = import_clashes(packages, dist.metadata["Name"])
    assert not clashes, ("import names installed by " + DIST + " are also provided by other distributions: " +
                         "; ".join(f"{name} (also {', '.join(others)})" for name, others in clashes.items()))
    ours = sorted(name for name, dists in packages.items() if dist.metadata["Name"] in dists)
    assert ours == ["llama_erc"], f"{DIST} installs top-level names {ours}; only llama_erc belongs in site-packages"


def _our_modules() -> list[str]:
    import llama_erc  # here, not at the top: the clash tests above also run against an install of another layout
    return sorted(m.name for m in pkgutil.walk_packages(llama_erc.__path__, "llama_erc.")
                  if not m.name.endswith("__main__"))


def test_transformers_peft_and_every_module_of_ours_import_in_one_process(tmp_path):
    """A fresh interpreter, outside the checkout (so only what is installed is found): transformers'
    LlamaForCausalLM, peft, and then every module of the package."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    code = ("import importlib, sys\n"
            "from transformers import LlamaForCausalLM\n"
            "import peft\n"
            f"for name in {_our_modules()!r}:\n"
            "    importlib.import_module(name)\n"
            "import llama_erc.kernels, kernels\n"
            "assert kernels.__file__ != llama_erc.kernels.__file__\n"
            "print('ok', len(sys.modules))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]


def test_wheel_holds_only_the_package(tmp_path):
    """A wheel built from the repository: llama_erc/ (with the demo set) and its metadata, nothing else."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "No matching distribution" in proc.stderr:
        pytest.skip("no package index to fetch the build backend from")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [wheel] = tmp_path.glob("llama_lora_erc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    outside = [n for n in names if not (n.startswith("llama_erc/") or n.split("/")[0].endswith(".dist-info"))]
    assert not outside, f"the wheel holds files outside llama_erc/: {outside[:10]}"
    assert {"llama_erc/engine/train.py", "llama_erc/kernels/rms_norm.py", "llama_erc/benchmarks/bench.py",
            "llama_erc/demo/meld_format/train_sent_emo.csv"} <= set(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("llama-erc-train", "llama-erc-eval", "llama-erc-bench"):
        assert script in text, text


@pytest.mark.parametrize("script", ["llama-erc-train", "llama-erc-eval", "llama-erc-bench"])
def test_console_scripts_run_from_another_directory(tmp_path, script):
    _installed()
    exe = Path(sys.executable).parent / script
    if not exe.exists():
        pytest.skip(f"{script} is not installed beside {sys.executable}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(exe), "--help"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "--" in proc.stdout, proc.stderr[-3000:]


def _imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module imported, names taken from it, at module level) for every import in a file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names], id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], id(node) in top) for a in node.names]
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "llama_erc" and len(parts) > 1 else None


def test_rooms_import_one_way_and_no_private_names_across_rooms():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _room(_module_name(path))
        for module, names, _ in _imports(path):
            there = _room(module)
            if module.startswith("llama_erc.") and there and here and there != here:
                if there not in ALLOWED[here]:
                    problems.append(f"{path.relative_to(ROOT)}: {here} imports {module}")
                private = [n for n in names if n.startswith("_")]
                if private:
                    problems.append(f"{path.relative_to(ROOT)}: imports private {private} from {module}")
    assert not problems, "\n".join(problems)


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent / dotted.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_no_import_cycles():
    """Module-level imports between our modules form no cycle (`from pkg import name` counts as importing
    pkg.name when that is a module, else pkg's __init__)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        graph[name] = {target for module, names, top in _imports(path) if top and module.startswith("llama_erc")
                       for target in ([f"{module}.{n}" if _is_module(f"{module}.{n}") else module for n in names]
                                      or [module])
                       if target != name}
    cycles, done = [], set()

    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in done:
                visit(nxt, stack + [nxt])
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])
    assert not cycles, "\n".join(sorted(set(cycles)))
