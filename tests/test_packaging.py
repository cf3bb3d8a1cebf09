"""Installing skr8tr says nothing to worry about: no setuptools warning on an editable
install (the way tools/test and tools/demo install it), and the wheel holds only the
package."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
def test_editable_install_prints_no_warning(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # as tools/_venv.sh does: a recent pip shows the build backend's warnings (pip 23 hid them)
    upgrade = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade",
                              "pip"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    proc = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-e", str(REPO)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    for noise in ("BuildBackendWarning", "SetuptoolsDeprecationWarning", "!!",
                  "Please be careful"):
        assert noise not in out, out
    check = subprocess.run([str(python), "-c", "import skr8tr; print(skr8tr.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert check.stdout.strip() == str(REPO / "skr8tr" / "__init__.py")


@pytest.mark.e2e
def test_wheel_holds_only_the_package(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w",
                           str(tmp_path), str(REPO)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("skr8tr-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"skr8tr", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    assert "skr8tr/web/index.html" in zipfile.ZipFile(wheel).namelist()
