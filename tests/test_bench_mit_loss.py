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


def test_providers_take_turns_in_rounds():
    """time_group: the providers take turns, the order rotated from round to round, so that a
    burst of load falls on all of them; each turn starts with an untimed call (after another
    provider's calls a step is not in its steady state); the repeats are spread over the rounds
    exactly (a provider of fewer repeats than rounds sits some out); a provider that fails in a
    later round gets an error row and the others still get their timings."""
    import time
    import types

    import torch

    calls = []

    def provider_step(name, fail_after=None):
        def step():
            if fail_after is not None and calls.count(name) >= fail_after:
                raise RuntimeError(f"{name} broke")
            calls.append(name)
            time.sleep(bench.CHEAP_CALL_S + 0.001)  # not cheap: no warmup loop before sizing
        return step

    shape = bench.parse_shapes("4x3")[0]
    case = bench.Case(shape, "fp32", "fwd", torch.device("cpu"), torch.zeros(4, 3),
                      torch.zeros(4, dtype=torch.long))

    def run(names, reps, fail=None):
        calls.clear()
        cfg = bench.Config(device=torch.device("cpu"), sweep="quick", shapes=[shape],
                           dtypes=("fp32",), modes=("fwd",), providers=[], target_s=1e-3,
                           min_reps=reps, max_reps=reps, rep_ms=1, measure_memory=False,
                           budget_s=None, rounds=3)
        prepared = [bench.Prepared(types.SimpleNamespace(name=n),
                                   {"provider": n, "status": "ok", "note": ""},
                                   provider_step(n, fail if n == "d" else None), warm_call_s=0.06)
                    for n in names]
        bench.time_group(prepared, case, cfg)
        return "".join(calls), [p.row for p in prepared]

    # six repeats, two a round, each turn one untimed call first; d fails at its fourth call
    # (round 2's untimed one) and has no turn after that
    sequence, rows = run("abcd", 6, fail=3)
    assert sequence == "aaabbbcccddd" + "bbbccc" + "aaa" + "cccaaabbb"
    for row in rows[:3]:
        assert row["status"] == "ok" and row["repeats"] == 6 and row["rounds"] == 3
        assert row["median_ms"] >= bench.CHEAP_CALL_S * 1e3
    assert rows[3]["status"] == "error" and "d broke" in rows[3]["note"]
    assert "median_ms" not in rows[3]
    # two repeats over three rounds: turns in rounds 2 and 3 only, two timed calls in all
    sequence, rows = run("ab", 2)
    assert sequence == "bbaa" + "aabb"
    assert all(r["repeats"] == 2 and r["rounds"] == 2 for r in rows)


def test_a_row_over_the_copy_roofline_is_flagged():
    # a copy slowed by other work (8 ms where it takes 0.03) gave "roof 1053%" unflagged
    import torch

    shape = bench.parse_shapes("8x5")[0]
    x = torch.zeros(8, 5)
    case = bench.Case(shape, "fp32", "fwdbwd", torch.device("cpu"), x,
                      torch.zeros(8, dtype=torch.long))
    rows = [{"provider": "copy", "status": "ok", "note": "", "median_ms": 8.0},
            {"provider": "cpu", "status": "ok", "note": "", "median_ms": 1.0},
            {"provider": "eager", "status": "ok", "note": "", "median_ms": 20.0}]
    assert bench.finish_group(rows, case, None) == 8.0
    assert rows[1]["roofline_frac"] == 12.0 and "over the roofline" in rows[1]["note"]
    assert rows[2]["roofline_frac"] == 0.6 and rows[2]["note"] == ""
