"""The launcher: runs a script with the patch applied in every rank, configured by flags or env."""

import os
import subprocess
import sys

import pytest

from moe_lbl import run as launcher

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch(args, env=None, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def test_environment_and_flags_agree(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    flags = ["--scope", "micro", "--coeff", "0.02", "--micro-coeff", "0", "--buffer", "false",
             "--async-sync", "no", "--kernels", "false", "--", str(script), "--lr", "1"]
    env = {"MOE_LBL_SCOPE": "micro", "MOE_LBL_COEFF": "0.02", "MOE_LBL_MICRO_COEFF": "0",
           "MOE_LBL_BUFFER": "0", "MOE_LBL_ASYNC_SYNC": "off", "MOE_LBL_KERNELS": "False"}
    from_flags = launcher.parse(flags, environ={})
    from_env = launcher.parse(["--", str(script), "--lr", "1"], environ=env)
    assert from_flags == from_env == (dict(scope="micro", coeff=0.02, micro_coeff=0.0, buffer=False,
                                           async_sync=False, kernels=False), str(script), ["--lr", "1"])
    # A flag wins over the environment; the form without "--" works too.
    assert launcher.parse(["--scope", "global", str(script)], environ=env).options["scope"] == "global"


@pytest.mark.parametrize("env,error", [
    ({"MOE_LBL_BUFFER": "maybe"}, "MOE_LBL_BUFFER must be one of"),
    ({"MOE_LBL_COEFF": "lots"}, "MOE_LBL_COEFF must be a number"),
])
def test_bad_environment_is_named(tmp_path, env, error):
    script = tmp_path / "train.py"
    script.write_text("")
    with pytest.raises(launcher.UsageError, match=error):
        launcher.parse(["--", str(script)], environ=env)


def write_script(tmp_path, body):
    marker = tmp_path / "started"
    script = tmp_path / "train.py"
    script.write_text(f"import sys\nopen({str(marker)!r}, 'w').write(' '.join(sys.argv))\n{body}\n")
    return script, marker


def test_script_exit_codes_propagate(tmp_path):
    script, marker = write_script(tmp_path, "sys.exit(3)")
    result = launch(["-m", "moe_lbl.run", "--", str(script), "--flag", "x"])
    assert result.returncode == 3 and marker.read_text() == f"{script} --flag x"
    script, _ = write_script(tmp_path, "raise ValueError('boom from the script')")
    result = launch(["-m", "moe_lbl.cli", "run", str(script)])
    assert result.returncode == 1 and "boom from the script" in result.stderr


@pytest.mark.parametrize("args,env,error", [
    (["--scoop", "global"], {}, "unrecognized arguments: --scoop"),
    (["--scope", "batch"], {}, "unknown scope 'batch'"),
    (["--kernels", "sometimes"], {}, "--kernels must be one of"),
    ([], {"MOE_LBL_COEFF": "-1"}, "coeff must be a finite number >= 0"),
    # A misspelled variable would otherwise be ignored, silently running the default scope.
    ([], {"MOE_LBL_SCOP": "micro"}, "unknown environment variable MOE_LBL_SCOP: the launcher reads MOE_LBL_SCOPE, "),
    # Without CUDA the fused router cannot run: say so now, not at the first forward.
    (["--kernels", "true"], {"TRITON_INTERPRET": "0"}, "kernels=True runs the fused router on CUDA, and this "
                                                       "machine has none"),
])
def test_bad_options_fail_before_the_script_starts(tmp_path, args, env, error):
    if "TRITON_INTERPRET" in env and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    script, marker = write_script(tmp_path, "")
    result = launch(["-m", "moe_lbl.run", *args, "--", str(script)], env=env)
    assert result.returncode == 2 and error in result.stderr, result.stderr[-2000:]
    assert not marker.exists()


def test_launcher_flags_after_the_script_go_to_the_script_with_a_warning(tmp_path):
    script, marker = write_script(
        tmp_path, "from moe_lbl.patches.megatron import patch_options; print('scope', patch_options().scope)")
    result = launch(["-m", "moe_lbl.cli", "run", str(script), "--scope", "micro", "--lr=1", "--kernels=false"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert marker.read_text() == f"{script} --scope micro --lr=1 --kernels=false"  # the script's, as torchrun does
    assert "scope global" in result.stdout  # the launcher's default, not the script's flag
    warnings = [line for line in result.stderr.splitlines() if line.startswith("moe-lbl run: warning:")]
    assert sorted(warnings) == [
        "moe-lbl run: warning: --kernels comes after the script, so it goes to the script (launcher options go "
        "before it)",
        "moe-lbl run: warning: --scope comes after the script, so it goes to the script (launcher options go "
        "before it)"]


def test_unsupported_megatron_fails_before_the_script_starts(tmp_path, monkeypatch, capsys):
    from moe_lbl.patches import megatron as patch_module
    from moe_lbl.patches.megatron import compatibility

    script, marker = write_script(tmp_path, "")
    monkeypatch.setattr(compatibility, "megatron_core_install",
                        lambda: patch_module.MegatronInstall("0.11.0", "/site/megatron/core", "0.11.0", True))
    with pytest.raises(SystemExit) as exit_info:
        launcher.main(["--", str(script)])
    assert exit_info.value.code == 2 and "megatron-core 0.11.0 is not supported" in capsys.readouterr().err
    assert not marker.exists() and not patch_module.is_patched()
    assert str(script.parent) not in sys.path  # the script's directory was put first only to patch and run
