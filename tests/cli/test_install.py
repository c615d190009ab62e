"""What a wheel of the project installs: every package of the source tree (a missing entry in
pyproject.toml's list builds a wheel that fails at import, as balance_step_details once did)."""

import os

import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_package_in_the_tree_is_in_the_wheel():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for root, dirs, files in os.walk(os.path.join(REPO, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" in files:
                relative = os.path.relpath(root, os.path.join(REPO, folder))
                found.add(name if relative == "." else f"{name}.{relative.replace(os.sep, '.')}")
    assert sorted(found) == sorted(setuptools["packages"])
