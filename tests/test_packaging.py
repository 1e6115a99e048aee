"""The source distribution builds the extension on another machine: it must carry every C++/CUDA
source and header that setup.py compiles or includes (setuptools adds only the listed sources)."""
import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT


def test_sdist_carries_every_csrc_file(tmp_path):
    # From the tracked files alone: an egg-info left by an earlier build would act as a manifest.
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = listed.stdout.split()
    src = tmp_path / "src"
    for name in tracked:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
                         cwd=src, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = [p for p in tracked if p.startswith("csrc/") and p not in names]
    assert not missing, missing
    assert "docs/KERNEL_MATH.md" in names
    # the license, and what the shipped tests need to run
    assert {"LICENSE", "tests/conftest.py"} <= names
    assert not [p for p in tracked if p.startswith("tests/data/") and p not in names]
    assert "SetuptoolsDeprecationWarning" not in out.stderr, out.stderr[-2000:]


def _setup_py_without_torch(args, cwd):
    """setup.py run where torch cannot be imported (as in pip's isolated build environment)."""
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            f"sys.argv = ['setup.py', *{list(args)!r}]; runpy.run_path('setup.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_a_build_without_torch_stops_with_a_clear_message(tmp_path):
    # torch is not a build requirement (an isolated build would compile against the newest
    # torch, not the user's): a wheel build without it says what to do; an sdist needs no torch.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", "build", "*.so", ".git", "*.egg-info", "results", "__pycache__"))
    out = _setup_py_without_torch(["-q", "bdist_wheel", "-d", str(tmp_path)], src)
    assert out.returncode != 0
    assert "pip install --no-build-isolation" in out.stderr, out.stderr[-2000:]
    out = _setup_py_without_torch(["-q", "sdist", "-d", str(tmp_path)], src)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(tmp_path.glob("*.tar.gz"))
