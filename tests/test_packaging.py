"""The source distribution builds the extension on another machine: it must carry every C++/CUDA
source and header that setup.py compiles or includes (setuptools adds only the listed sources)."""
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sdist_carries_every_csrc_file(tmp_path):
    out = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    tracked = subprocess.run(["git", "ls-files", "csrc"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    wanted = tracked or [str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()]
    missing = [p for p in wanted if p not in names]
    assert not missing, missing
    assert "docs/KERNEL_MATH.md" in names
