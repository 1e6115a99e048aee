"""The README's examples run as written."""
import re

import pytest
import torch

from mitkernels import _backends
from conftest import ROOT, run_python


def _python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_blocks_run(index):
    exec(compile(_python_blocks()[index], f"README block {index}", "exec"), {})


def _markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "benchmarks").rglob("*.md"))]


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    """Every relative link and image of the docs names a file that exists."""
    targets = re.findall(r"\]\(([^)\s]+)\)", doc.read_text())
    missing = [t for t in targets if "://" not in t and not t.startswith("#")
               and not (doc.parent / t.split("#")[0]).exists()]
    assert not missing, missing


def test_compile_example_runs():
    out = run_python(["examples/compile_step.py"], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "steps=5" in out.stdout


@pytest.mark.skipif(_backends.unavailable_reason("cpu", torch.device("cpu")) is not None,
                    reason="the distributed path runs on the kernel backends")
def test_ddp_example_runs_on_two_processes():
    out = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                      "29517", "examples/ddp_train.py", "--steps", "3"], timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 ranks agree" in out.stdout
