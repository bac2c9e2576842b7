"""The whole-image profile report (benchmarks/image_bench.py): GPU idle time per pipeline phase.

The report decided a performance fix (docs/benchmarks.md, "H200 runs"), so its arithmetic is
tested here on a synthetic Chrome trace of the shape torch.profiler writes.
"""

from __future__ import annotations

import gzip
import json

import pytest

from benchmarks.image_bench import idle_by_phase, main, spans_from_trace


def _x(name: str, cat: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 0, "tid": 0}


@pytest.fixture()
def trace(tmp_path):
    """0-10 ms encode (GPU idle 0-3 ms while a pageable copy waits), 10-40 ms denoise (kernels
    1 us apart, as inside a graph replay), 40-45 ms host tail with the GPU done."""
    events = [
        _x("dynamicid.encode_identities", "user_annotation", 0, 10_000),
        _x("aten::copy_", "cpu_op", 500, 2_000),
        _x("cudaStreamSynchronize", "cuda_runtime", 600, 1_800),
        _x("clip", "kernel", 3_000, 7_000),
        _x("dynamicid.denoise", "user_annotation", 10_000, 30_000),
        # the same range on the GPU timeline: an annotation, not work
        _x("dynamicid.denoise", "gpu_user_annotation", 10_000, 30_000),
        _x("python tail", "cpu_op", 40_000, 5_000),
    ]
    t = 10_000.0
    while t < 40_000:  # 99 us kernels, 1 us apart
        events.append(_x("unet", "kernel", t, 99))
        t += 100
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events + [{"ph": "M", "name": "process_name"}]}, fh)
    return path


def test_idle_time_is_attributed_to_phases_and_kernel_boundaries_are_busy(trace):
    report = idle_by_phase(spans_from_trace(trace))
    assert report["call_ms"] == pytest.approx(45.0)
    # idle: 0-3 ms (copy wait) + 40-45 ms (tail, the last kernel ends at 39.999 ms)
    assert report["gpu_idle_ms"] == pytest.approx(8.0, abs=0.01)
    enc, den = report["phases"]["dynamicid.encode_identities"], report["phases"]["dynamicid.denoise"]
    assert enc["gpu_busy_ms"] == pytest.approx(7.0) and enc["gpu_idle_ms"] == pytest.approx(3.0)
    # 1 us gaps bridged, the annotation ignored: only the 1 us after the last kernel is idle
    assert den["gpu_idle_ms"] == pytest.approx(0.001, abs=1e-6)
    tail, first = report["longest_idle_gaps"][:2]
    assert tail["ms"] == pytest.approx(5.0, abs=0.01) and tail["phase"] == "-"
    assert tail["host_ops"] == ["python tail"]
    assert first["ms"] == pytest.approx(3.0) and first["phase"] == "dynamicid.encode_identities"
    assert first["host_ops"][0] == "cudaStreamSynchronize"  # innermost op running while the GPU waited


def test_unbridged_kernel_gaps_count_as_idle(trace):
    report = idle_by_phase(spans_from_trace(trace), bridge_us=0.5)
    # 300 gaps of 1 us inside denoise are now idle
    assert report["phases"]["dynamicid.denoise"]["gpu_idle_ms"] == pytest.approx(0.3, abs=0.01)


def test_cli_prints_the_report(trace, capsys):
    main([str(trace)])
    out = capsys.readouterr().out
    assert str(trace) in out
    assert json.loads(out[len(str(trace)) + 1:])["gpu_idle_ms"] == pytest.approx(8.0, abs=0.01)


def test_the_recorded_command_names_the_device_output_folder_as_out(monkeypatch):
    """A device call's $OUT is a path of that machine only: results record `--out $OUT`, other paths as given."""
    import torch

    from benchmarks.run import environment

    monkeypatch.setenv("OUT", "/root/out")
    env = environment(torch.device("cpu"), ["--out", "/root/out", "--sections", "step"])
    assert env["command"] == "python -m benchmarks.run --out $OUT --sections step"
    monkeypatch.delenv("OUT")
    env = environment(torch.device("cpu"), ["--out", "benchmarks/results"])
    assert env["command"] == "python -m benchmarks.run --out benchmarks/results"
