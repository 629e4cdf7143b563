"""mopd/__init__.py refuses to start when one of its generic top-level names (`envs`, `configs`...)
resolves to another distribution's package or a stray folder, instead of importing the wrong code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mopd
import rollout

REPO = Path(__file__).resolve().parents[1]


def _import_mopd(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", "import mopd.core.types, rollout; print(rollout.__file__)"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_every_top_level_package_is_this_distributions():
    mopd.check_sibling_packages()
    assert Path(rollout.__file__).resolve() == REPO / "rollout" / "__init__.py"


@pytest.mark.parametrize("name", mopd.SIBLING_PACKAGES)
def test_another_package_of_the_same_name_is_refused(tmp_path, name):
    decoy = tmp_path / "other_site" / name
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("")
    done = _import_mopd(tmp_path, pythonpath=tmp_path / "other_site")
    assert done.returncode != 0
    assert f"the top-level package {name!r} resolves to {decoy / '__init__.py'}" in done.stderr, done.stderr


def test_a_clean_directory_imports_mopd(tmp_path):
    done = _import_mopd(tmp_path)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() == REPO / "rollout" / "__init__.py"
