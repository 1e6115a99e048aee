"""The README's examples run as written."""
import re
from pathlib import Path

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


_SOURCE = r"[\w./-]+\.(?:py|h|cpp|cu|md|sh|toml)"


def _source_file(path: str):
    """A repository file named by its path, or by a name unique in the repository."""
    if (ROOT / path).is_file():
        return ROOT / path
    found = [p for p in ROOT.rglob(Path(path).name)
             if not {".venv", "build", ".git"} & set(p.relative_to(ROOT).parts)
             and str(p).endswith("/" + path)]
    return found[0] if len(found) == 1 else None


def test_developer_guide_names_what_exists():
    """docs/DEVELOPING.md points into the code as `file::name` and `dir/file`: each file exists
    (or, given by its name alone, is one file of the repository) and each name is in it."""
    text = (ROOT / "docs" / "DEVELOPING.md").read_text()
    refs = re.findall(rf"({_SOURCE})::(\w+)", text)
    paths = re.findall(rf"`((?:[\w.-]+/)+[\w.-]+\.(?:py|h|cpp|cu|md|sh|toml))`", text)
    assert len(refs) > 20 and len(paths) > 10  # the patterns still read the page
    problems = [f"no file {p}" for p in paths if not (ROOT / p).is_file()]
    for path, name in refs:
        source = _source_file(path)
        if source is None:
            problems.append(f"no single file {path}")
        elif not re.search(rf"\b{name}\b", source.read_text()):
            problems.append(f"{name} is not in {path}")
    assert not problems, problems
