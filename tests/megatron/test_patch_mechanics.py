"""How the patch is put in place: the supported range it declares, its replacements and their originals."""

import os
import re

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from moe_lbl.patches import megatron as patch_module

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_pyproject_requires_the_supported_megatron_range():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    megatron = [Requirement(d) for d in dependencies if Requirement(d).name == "megatron-core"]
    assert [r.specifier for r in megatron] == [SpecifierSet(patch_module.SUPPORTED_MEGATRON)]


def test_readme_and_setup_state_the_supported_range_and_the_tested_release():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert f"Supported Megatron-Core: `{patch_module.SUPPORTED_MEGATRON}`" in readme
    assert f"megatron-core=={patch_module.NEWEST_TESTED_MEGATRON}" in readme
    assert SpecifierSet(patch_module.SUPPORTED_MEGATRON).contains(patch_module.NEWEST_TESTED_MEGATRON)
    with open(os.path.join(REPO, "scripts", "version_matrix.sh")) as f:
        matrix = re.search(r'VERSIONS="\$\{MATRIX_VERSIONS:-([^}]*)\}"', f.read()).group(1).split()
    # Every other release of the range, the main environment's excluded.
    assert patch_module.NEWEST_TESTED_MEGATRON not in matrix and len(matrix) == 7
    assert all(SpecifierSet(patch_module.SUPPORTED_MEGATRON).contains(v) for v in matrix)


def test_each_replacement_wraps_its_original_and_says_what_it_replaces():
    import moe_lbl

    points = patch_module.replacements()
    originals = {(id(owner), name): owner.__dict__[name] for owner, name, _ in points}
    moe_lbl.patch_megatron(scope="global")
    for owner, name, replacement in points:
        installed = owner.__dict__[name]
        assert installed is replacement
        assert installed.__wrapped__ is originals[id(owner), name], name
        assert f"Replaces {owner.__name__.rsplit('.', 1)[-1]}.{name}" in installed.__doc__, name
    assert len(patch_module.replaced_names()) == len(points)
    moe_lbl.unpatch_megatron()
    for owner, name, replacement in points:
        assert owner.__dict__[name] is originals[id(owner), name]
        assert not hasattr(replacement, "__wrapped__"), name


def test_every_patch_option_is_an_argument_a_launcher_flag_a_variable_and_documented():
    """PatchOptions states the options once: patch_megatron's signature and the launcher's flags
    and variables are made from it, and the README's table documents each."""
    import inspect

    import moe_lbl
    from moe_lbl import run as launcher
    from moe_lbl.patches.megatron.configuration import OPTIONS

    parameters = inspect.signature(moe_lbl.patch_megatron).parameters
    assert list(parameters) == [option.name for option in OPTIONS] + ["config"]
    assert all(parameters[option.name].default == option.default for option in OPTIONS)
    usage = launcher._argument_parser().format_help()
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    for option in OPTIONS:
        assert launcher.flag(option.name) in usage and launcher.variable(option.name) in usage, option.name
        default = f'"{option.default}"' if isinstance(option.default, str) else option.default
        assert f"\n| `{option.name}={default}`" in readme, option.name
