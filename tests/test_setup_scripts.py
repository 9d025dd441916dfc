"""A missing system dependency (espeak-ng) fails CI instead of silently skipping the speech tests:
scripts/check_system_deps.sh (called by scripts/setup.sh) exits non-zero with CI=true and only
warns otherwise, and the tests' ``espeak`` fixture fails under CI=true instead of skipping.

The script runs with PATH restricted to a temporary folder holding only what it may use (links to
bash and id, and stubs), so it can never reach the real apt-get or espeak-ng."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_system_deps.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(not all(map(shutil.which, ("bash", "id", "chmod"))), reason="needs bash, id and chmod")


def stub(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)
    return path


def bin_dir(tmp_path: Path, *, root: bool = False, browser: bool = True) -> Path:
    """A PATH folder with bash and id only: no apt-get, no sudo, no espeak-ng. root=True stubs id
    to print uid 0, so the script takes its apt-get path without sudo whoever runs the tests.
    browser=True stubs chromium and chromedriver (present), so the espeak-ng tests see espeak-ng alone missing."""
    folder = tmp_path / "bin"
    folder.mkdir()
    os.symlink(BASH, folder / "bash")
    if root:
        stub(folder, "id", 'echo 0')
    else:
        os.symlink(shutil.which("id"), folder / "id")
    if browser:
        stub(folder, "chromium", "exit 0")
        stub(folder, "chromedriver", "exit 0")
    return folder


def check(folder: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {"PATH": str(folder), "HOME": str(folder.parent)}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([BASH, str(SCRIPT)], env=env, check=False, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_espeak_ng_without_apt_get_fails_under_ci(tmp_path, ci):
    proc = check(bin_dir(tmp_path), ci)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, naming the dependency and what it is for
    assert lines[0].startswith("error:") and "espeak-ng" in lines[0] and "speech synthesis" in lines[0]
    assert "no apt-get" in lines[0]


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_missing_espeak_ng_outside_ci_only_warns(tmp_path, ci):
    proc = check(bin_dir(tmp_path), ci)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("warning:") and "espeak-ng" in proc.stderr and "speech synthesis" in proc.stderr


def test_failed_apt_get_install_is_retried_after_an_update_then_fails_under_ci(tmp_path):
    folder = bin_dir(tmp_path, root=True)
    calls = tmp_path / "apt-calls"
    stub(folder, "apt-get", f'echo "$*" >> {calls}; exit 100')
    proc = check(folder, "true")
    assert proc.returncode != 0
    assert calls.read_text().splitlines() == ["install -y -q espeak-ng", "update -q"]  # the update failed too
    assert "apt-get install -y espeak-ng failed" in proc.stderr and proc.stderr.startswith("error:")


def test_apt_get_installing_espeak_ng_passes_under_ci(tmp_path):
    folder = bin_dir(tmp_path, root=True)
    os.symlink(shutil.which("chmod"), folder / "chmod")  # for the stub below
    # installs on the second try, after an update (a fresh container's empty package lists)
    stub(folder, "apt-get", f'''case "$*" in
  update*) : > {tmp_path}/updated ;;
  install*) [ -e {tmp_path}/updated ] || exit 100; echo exit 0 > {folder}/espeak-ng; chmod +x {folder}/espeak-ng ;;
esac''')
    proc = check(folder, "true")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert (folder / "espeak-ng").is_file()


def test_espeak_ng_present_needs_nothing(tmp_path):
    folder = bin_dir(tmp_path, root=True)
    stub(folder, "espeak-ng", "exit 0")
    stub(folder, "apt-get", f": > {tmp_path}/apt-called; exit 100")
    proc = check(folder, "true")
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == ""
    assert not (tmp_path / "apt-called").exists()


def test_setup_sh_runs_the_check_and_does_not_swallow_its_failure():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "set -euo pipefail" in setup
    calls = [line.strip() for line in setup.splitlines() if "check_system_deps.sh" in line and not line.lstrip().startswith("#")]
    assert calls == ["bash scripts/check_system_deps.sh"]  # no "|| true": its exit status stops setup.sh


# --- chromium (the report tests render report.html in it) --------------------------------------

def test_missing_chromium_without_apt_get_fails_under_ci(tmp_path):
    folder = bin_dir(tmp_path, browser=False)
    stub(folder, "espeak-ng", "exit 0")
    proc = check(folder, "true")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr  # chromium, chromium-driver: one line each
    assert all(line.startswith("error:") and "no apt-get" in line for line in lines)
    assert "chromium" in lines[0] and "report.html" in lines[0] and "chromium-driver" in lines[1]


def test_missing_chromium_outside_ci_only_warns(tmp_path):
    folder = bin_dir(tmp_path, browser=False)
    stub(folder, "espeak-ng", "exit 0")
    proc = check(folder, None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("warning:") and "chromium" in proc.stderr


def test_apt_get_installs_chromium_and_its_driver(tmp_path):
    folder = bin_dir(tmp_path, root=True, browser=False)
    stub(folder, "espeak-ng", "exit 0")
    os.symlink(shutil.which("chmod"), folder / "chmod")
    calls = tmp_path / "apt-calls"
    stub(folder, "apt-get", f'''echo "$*" >> {calls}
case "$*" in
  "install -y -q chromium") echo exit 0 > {folder}/chromium; chmod +x {folder}/chromium ;;
  "install -y -q chromium-driver") echo exit 0 > {folder}/chromedriver; chmod +x {folder}/chromedriver ;;
  *) exit 100 ;;
esac''')
    proc = check(folder, "true")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert calls.read_text().splitlines() == ["install -y -q chromium", "install -y -q chromium-driver"]


# --- the espeak fixture -----------------------------------------------------------------------

def run_fixture(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    """A test using the real conftest's espeak fixture, in a pytest run whose PATH has no espeak-ng."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_needs_espeak.py").write_text("def test_needs_espeak(espeak):\n    assert espeak\n")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(empty)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, check=False, capture_output=True, text=True, timeout=120)


def test_espeak_fixture_fails_under_ci_when_espeak_ng_is_missing(tmp_path):
    proc = run_fixture(tmp_path, "true")
    assert proc.returncode == 1, proc.stdout  # a failure (error in setup), not a skip
    assert "1 error" in proc.stdout and "missing system dependency espeak-ng, needed for speech synthesis" in proc.stdout


def test_espeak_fixture_skips_outside_ci_when_espeak_ng_is_missing(tmp_path):
    proc = run_fixture(tmp_path, None)
    assert proc.returncode == 0, proc.stdout
    assert "1 skipped" in proc.stdout and "missing system dependency espeak-ng" in proc.stdout
