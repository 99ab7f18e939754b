"""The project's shape: no import name of ours is also a dependency's, and the install exports only the
native extension. (transformers 5.25 imports the PyPI package `kernels`; a folder of ours by that name,
first on sys.path, broke every export.)

    python -m pytest -q tests/test_layout.py
"""
import ast
import importlib.metadata
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_import_names():
    """Every name `import X` can reach in this project: root modules and packages, bench/'s modules (bench
    scripts run with bench/ first on sys.path), and the native extension."""
    names = {"_nanoslm"}
    for folder in (ROOT, os.path.join(ROOT, "bench")):
        for entry in os.listdir(folder):
            path = os.path.join(folder, entry)
            if entry.endswith(".py"):
                names.add(entry[:-3])
            elif os.path.isfile(os.path.join(path, "__init__.py")):
                names.add(entry)
    return names


def test_project_names_are_listed():
    names = project_import_names()
    assert {"_nanoslm", "model", "tokenizer", "train", "triton_ops", "machine"} <= names


def test_no_installed_distribution_provides_a_name_of_ours():
    provided = importlib.metadata.packages_distributions()  # import name -> distributions providing it
    clashes = {name: dists for name in project_import_names()
               if (dists := [d for d in provided.get(name, []) if d.lower() != "nanoslm"])}
    assert not clashes, (f"installed distributions provide these import names of ours, so one shadows the "
                         f"other: {clashes}; rename ours")


def test_the_install_exports_only_the_extension():
    provided = importlib.metadata.packages_distributions()
    ours = sorted(name for name, dists in provided.items()
                  if any(d.lower() == "nanoslm" for d in dists) and not name.startswith("__editable__"))
    assert ours == ["_nanoslm"], f"setup.py installs {ours}: generic names in a user's site-packages"


# --- the floor: scripts stand on library modules, never on one another --------------------------------------

SCRIPTS = {"prepare", "train", "sample", "finetune", "export", "ablate"}


def imported_names(path):
    """The top-level names of every module path imports, at any depth (a function's own imports too)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def root_modules():
    return sorted(entry[:-3] for entry in os.listdir(ROOT) if entry.endswith(".py") and entry != "setup.py")


def test_no_script_or_library_module_imports_a_script():
    assert SCRIPTS <= set(root_modules())
    leaning = {name: sorted(imported_names(os.path.join(ROOT, name + ".py")) & (SCRIPTS - {name}))
               for name in root_modules()}
    assert not {k: v for k, v in leaning.items() if v}, "import library modules, not scripts"


def test_imports_are_found_at_any_depth(tmp_path):
    """What the check above relies on: imports inside functions and `import x as y` count too."""
    path = tmp_path / "leaning.py"
    path.write_text("import os\n\ndef f():\n    from train import main\n    import sample as s\n"
                    "from . import relative\n")
    assert imported_names(str(path)) == {"os", "train", "sample"}


def test_every_module_reads_in_one_sitting():
    lengths = {name: sum(1 for _ in open(os.path.join(ROOT, name + ".py"), encoding="utf-8"))
               for name in root_modules()}
    assert not {k: n for k, n in lengths.items() if n > 500}, "split the module: one concern per file"
