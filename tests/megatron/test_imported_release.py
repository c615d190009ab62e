"""The Megatron-Core that runs is the one the patch follows: a source checkout first on the path
beside an installed wheel of another release, editable installs, and unrelated metadata.

Each case runs in a fresh interpreter, where `import megatron.core` finds what the case set up.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lbl.patches.megatron import MegatronInstall, check_megatron_version, megatron_core_install

REAL = megatron_core_install()  # the megatron.core this suite imports (the main environment's wheel)
WHEEL = importlib.metadata.version("megatron-core")  # what the environment's metadata names first


def python(code: str, cwd: Path, path: list[Path] = ()):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, path))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def package_info(version: str) -> str:
    return f"__version__ = {version!r}\n"


def fake_tree(root: Path, version: str | None) -> Path:
    """root/megatron/core with only an __init__ and (unless None) a package_info naming version."""
    core = root / "megatron" / "core"
    core.mkdir(parents=True)
    (core / "__init__.py").write_text("")
    if version is not None:
        (core / "package_info.py").write_text(package_info(version))
    return core


def distribution_metadata(site: Path, version: str, editable_source: Path | None = None) -> None:
    """An installed megatron-core distribution's metadata in site (an editable one points elsewhere)."""
    info = site / f"megatron_core-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: megatron-core\nVersion: {version}\n")
    if editable_source is not None:
        (info / "direct_url.json").write_text(json.dumps(
            {"url": editable_source.as_uri(), "dir_info": {"editable": True}}))


INSTALL = ("import dataclasses, json\n"
           "from moe_lbl.patches.megatron.compatibility import megatron_core_install\n"
           "print(json.dumps(dataclasses.asdict(megatron_core_install())))")


def installed(cwd: Path, path: list[Path]) -> MegatronInstall:
    done = python(INSTALL, cwd, path)
    assert done.returncode == 0, done.stderr
    return MegatronInstall(**json.loads(done.stdout))


def test_a_checkout_first_on_the_path_names_its_own_release_not_the_wheels(tmp_path):
    core = fake_tree(tmp_path / "checkout", "0.18.2+abc1234")
    found = installed(tmp_path, [tmp_path / "checkout"])
    assert found == MegatronInstall("0.18.2+abc1234", str(core), distribution=WHEEL, distribution_is_imported=False)
    assert found.release == (0, 18, 2)
    assert found.describe() == (f"0.18.2+abc1234 (imported from {core}; the installed distribution "
                                f"megatron-core {WHEEL} is not the one that runs)")


def test_a_wheel_names_its_release_without_the_environments_commit(tmp_path):
    # A wheel's package_info appends the commit of whatever git repository holds the environment.
    core = fake_tree(tmp_path / "site", "0.18.2+0badc0d")
    distribution_metadata(tmp_path / "site", "0.18.2")
    found = installed(tmp_path, [tmp_path / "site"])
    assert found == MegatronInstall("0.18.2", str(core), distribution="0.18.2", distribution_is_imported=True)
    assert found.describe() == "0.18.2"


def test_an_editable_install_is_the_checkout_it_points_at(tmp_path):
    core = fake_tree(tmp_path / "checkout", "0.18.2+abc1234")
    distribution_metadata(tmp_path / "site", "0.18.2", editable_source=tmp_path / "checkout")
    found = installed(tmp_path, [tmp_path / "checkout", tmp_path / "site"])
    assert found == MegatronInstall("0.18.2+abc1234", str(core), distribution="0.18.2", distribution_is_imported=True)


def test_without_package_info_only_metadata_of_the_same_files_tells(tmp_path):
    core = fake_tree(tmp_path / "site", None)
    distribution_metadata(tmp_path / "site", "0.17.1")
    assert installed(tmp_path, [tmp_path / "site"]) == MegatronInstall(
        "0.17.1", str(core), distribution="0.17.1", distribution_is_imported=True)
    fake_tree(tmp_path / "checkout", None)
    refused = python(INSTALL, tmp_path, [tmp_path / "checkout"])
    assert refused.returncode != 0
    assert "cannot tell which release the megatron.core at" in refused.stderr
    assert str(tmp_path / "checkout" / "megatron" / "core") in refused.stderr
    assert WHEEL not in refused.stdout  # the wheel's metadata does not stand in for the checkout


def test_unrelated_metadata_first_on_the_path_neither_refuses_nor_renames(tmp_path, monkeypatch):
    distribution_metadata(tmp_path / "stale", "0.11.0")
    monkeypatch.syspath_prepend(str(tmp_path / "stale"))
    assert importlib.metadata.version("megatron-core") == "0.11.0"  # what the metadata alone would say
    assert check_megatron_version() == REAL
    from moe_lbl.cli import info_lines

    assert f"megatron-core      {REAL.describe()}" in info_lines()


def symlinked_checkout(root: Path, version: str) -> Path:
    """A Megatron-LM-like checkout: the imported megatron.core's files, its package_info naming version."""
    core = root / "megatron" / "core"
    core.mkdir(parents=True)
    for entry in Path(REAL.location).iterdir():
        if entry.name not in ("package_info.py", "__pycache__"):
            (core / entry.name).symlink_to(entry)
    real_info = (Path(REAL.location) / "package_info.py").read_text()
    (core / "package_info.py").write_text(real_info + "\n" + package_info(version))
    return core


PROBE = """\
import json
import megatron.core
from moe_lbl.patches.megatron import live
found = live.get().features
print("PROBE " + json.dumps(dict(file=megatron.core.__file__, version=found.version,
      tp_cp_token_scale=found.tp_cp_token_scale, fp32_routing=found.fp32_routing)))
"""


@pytest.mark.parametrize("launcher", ["torchrun style: python -m moe_lbl.run from the checkout",
                                      "moe-lbl run SCRIPT from elsewhere"])
def test_the_launcher_patches_and_reports_the_checkout_that_runs(tmp_path, launcher):
    # The imported release's version-keyed behaviour, different from the wheel's on both gates.
    # The per-token scale's gate differs from the wheel's either way.
    label, release = ("0.18.2+abc1234", (0, 18, 2)) if REAL.release >= (0, 19) else ("0.19.1+abc1234", (0, 19, 1))
    per_token_scale, fp32_routing = release >= (0, 19), release >= (0, 18)
    checkout = tmp_path / "Megatron-LM"
    core = symlinked_checkout(checkout, label)
    (checkout / "pretrain_probe.py").write_text(PROBE)
    if launcher.startswith("torchrun"):
        command, cwd = [sys.executable, "-m", "moe_lbl.run", "--scope", "global", "--", "pretrain_probe.py"], checkout
    else:
        command = [str(Path(sys.executable).with_name("moe-lbl")), "run", "--scope", "global", "--",
                   str(checkout / "pretrain_probe.py")]
        cwd = tmp_path
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith(f"moe-lbl: patched megatron-core {label} (imported from {core}; the installed "
                               f"distribution megatron-core {WHEEL} is not the one that runs): scope=global")
               for line in lines), done.stdout
    probe = json.loads(next(line for line in lines if line.startswith("PROBE "))[len("PROBE "):])
    assert probe == dict(file=str(core / "__init__.py"), version=label, tp_cp_token_scale=per_token_scale,
                         fp32_routing=fp32_routing)


def test_an_unsupported_checkout_is_refused_by_its_own_release_before_the_script(tmp_path):
    checkout = tmp_path / "Megatron-LM"
    core = fake_tree(checkout, "0.20.0rc0+abc1234")
    (checkout / "pretrain_probe.py").write_text("print('the script ran')")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "moe_lbl.run", "--", "pretrain_probe.py"], capture_output=True,
                          text=True, cwd=checkout, env=env, timeout=300)
    assert done.returncode == 2 and "the script ran" not in done.stdout
    assert (f"moe-lbl run: megatron-core 0.20.0rc0+abc1234 (imported from {core}; the installed distribution "
            f"megatron-core {WHEEL} is not the one that runs) is not supported") in done.stderr
