"""How the patch is put in place: the supported range it declares, its replacements and their originals."""

import os
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
