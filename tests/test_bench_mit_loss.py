"""benchmarks/bench_mit_loss.py on a tiny run: [N, C] and segmentation ([N, C, H, W]) shapes."""
import csv

import pytest

from benchmarks import bench_mit_loss as bench
from conftest import run_python


def test_shapes_parse_with_spatial_dims():
    flat, seg = bench.parse_shapes("4x3,2x5x6x7")
    assert (flat.family, flat.label, flat.numel, flat.spatial) == ("medical", "4x3", 12, ())
    assert (seg.family, seg.label, seg.numel, seg.spatial) == ("segmentation", "2x5x6x7", 420,
                                                               (6, 7))
    with pytest.raises(Exception, match="NxC"):
        bench.parse_shapes("12")


def test_a_segmentation_step_runs_and_matches_eager(tmp_path):
    pytest.importorskip("mitkernels._C")
    out = run_python(["-m", "benchmarks.bench_mit_loss", "--shapes", "6x3,2x5x6x7", "--modes",
                      "fwdbwd", "--dtypes", "fp32", "--providers", "eager,cpu,torch_ce,copy",
                      "--out-dir", str(tmp_path)], timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [path] = [p for p in tmp_path.glob("*.csv") if not p.name.startswith("latest")]
    rows = list(csv.DictReader(open(path)))
    seg = [r for r in rows if r["spatial"] == "6x7"]
    assert {r["provider"] for r in seg} == {"eager", "cpu", "torch_ce", "copy"}
    assert all(r["status"] == "ok" and r["family"] == "segmentation" for r in seg), seg
    cpu = next(r for r in seg if r["provider"] == "cpu")
    assert float(cpu["max_rel_err"]) <= bench.ERROR_TOL[bench.DTYPES["fp32"]]
    assert int(cpu["bytes"]) == 3 * 2 * 5 * 6 * 7 * 4  # 2 reads + 1 write of the logits
