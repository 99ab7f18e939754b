"""The project's shape: no import name of ours is also a dependency's, and the install exports only the
native extension. (transformers 5.25 imports the PyPI package `kernels`; a folder of ours by that name,
first on sys.path, broke every export.)

    python -m pytest -q tests/test_layout.py
"""
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
