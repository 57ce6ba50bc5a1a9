"""The layout a reader meets: the method at the root, everything else in named folders, imports
running one way, lines a reader can hold."""
import ast
import sys

from conftest import ROOT

METHOD = ("model.py", "memory_queue.py", "positiveness.py", "loss.py")
ROOT_SCRIPTS = METHOD + ("train.py", "eval_linear.py", "walkthrough.py", "test_snclr.py")
PACKAGES = ("runtime", "images", "monitors", "tools")      # tests/ is pytest's, not a package


def project_modules() -> dict:
    """Dotted module name -> path, for every .py file of the project outside tests/."""
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    for package in PACKAGES:
        for p in (ROOT / package).glob("*.py"):
            modules[package if p.stem == "__init__" else f"{package}.{p.stem}"] = p
    return modules


def imported(path, modules) -> set:
    """The project modules a file imports at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules and name not in PACKAGES}
    return found


def test_the_root_holds_the_briefs_files_and_configuration_only():
    assert sorted(p.name for p in ROOT.glob("*.py")) == sorted(ROOT_SCRIPTS)
    assert not set(p.stem for p in ROOT.glob("*.py")) & set(sys.stdlib_module_names)  # queue.py would
    assert not (ROOT / "data").is_dir() or not (ROOT / "data" / "__init__.py").exists()  # shadow torch's


def test_imports_run_one_way_without_a_circle():
    modules = project_modules()
    graph = {name: imported(path, modules) for name, path in modules.items()}
    for name in (m[:-3] for m in METHOD):        # the method imports only the method
        assert graph[name] <= {m[:-3] for m in METHOD}, (name, graph[name])
    for name, deps in graph.items():             # the library folders never import the scripts
        if name.split(".")[0] in ("runtime", "images", "monitors"):
            assert not deps & {"train", "eval_linear", "walkthrough"}, (name, deps)
    state = {}

    def visit(name, path):
        state[name] = "open"
        for dep in graph[name]:
            assert state.get(dep) != "open", " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"
    for name in graph:
        if name not in state:
            visit(name, [name])


def test_lines_stay_within_100_columns_in_the_method_and_120_elsewhere():
    narrow = METHOD + ("train.py", "walkthrough.py")
    files = [p for p in ROOT.rglob("*.py") if not {"runs", "data", "output", ".data"} & set(p.parts)]
    wide = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if len(line) > (100 if p.name in narrow and p.parent == ROOT else 120)]
    assert not wide, wide


def test_the_scripts_and_tools_start_from_another_folder(tmp_path):
    """`python /path/to/train.py` and `python -m tools.X` (the root on PYTHONPATH) from any folder."""
    import subprocess
    from conftest import script_command, script_env
    for script in ("train.py", "eval_linear.py", "tools/bench.py", "tools/visualize.py", "tools/ablations.py"):
        res = subprocess.run([*script_command(script), "--help"], cwd=tmp_path, env=script_env(),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "usage:" in res.stdout, (script, res.stderr[-2000:])
