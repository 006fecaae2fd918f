"""``benchmarks/gpu_latency.py`` runs on the CPU as a smoke test (the GPU run is
``benchmarks/gpu_check.sh``)."""

import json

import pytest
import torch

from atedm_compile import triton_map
from scripts import load_benchmark

SMOKE = ["--device", "cpu", "--model", "tiny", "--calls", "1", "--warmup", "0", "--steps", "2", "--loops", "1",
         "--tome-keep", "0.7"]


@pytest.fixture(scope="module")
def gpu_latency():
    return load_benchmark("gpu_latency")


def _check_report(path, mode, triton=False):
    report = json.loads(path.read_text())
    results = report["modes"][mode]
    assert set(results) == {"full", "prune-less", "pruned", "ToMe", "DSAP"} | ({"pruned/triton"} if triton else set())
    for name in ("full", "prune-less", "pruned", "ToMe") + (("pruned/triton",) if triton else ()):
        assert results[name]["ms"] > 0 and results[name]["peak_mib"] is None, name
    assert results["DSAP"]["full"] > 0 and results["DSAP"]["DSAP"] > 0
    assert results["DSAP"]["graphs_compiled_in_loop"] == 0
    tmacs = report["tmacs"]
    assert tmacs["full"] > tmacs["prune-less"] > tmacs["pruned"] > 0 and tmacs["ToMe"] > 0
    assert tmacs["full"] > report["dsap_average_tmacs"] > tmacs["pruned"]
    return report


@pytest.mark.slow  # 13 s: a benchmark's smoke run
def test_cpu_smoke_run(gpu_latency, tmp_path, capsys):
    # With Triton installed the tests run its interpreter on the CPU (conftest.py): the
    # pruned/triton variant runs too.
    triton = triton_map.available("cpu")
    assert gpu_latency.main([*SMOKE, "--modes", "eager", "--json", str(tmp_path / "report.json")]) == 0
    _check_report(tmp_path / "report.json", "eager", triton)
    out = capsys.readouterr().out
    rows = ["eager     full", "eager     prune-less", "eager     pruned", "eager     ToMe", "Sampling loop"]
    for row in rows + (["eager     pruned/triton"] if triton else []):
        assert row in out, row
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_triton_variant_is_left_out_where_triton_cannot_run(gpu_latency, monkeypatch, capsys):
    monkeypatch.setattr(triton_map, "available", lambda device: False)
    args = gpu_latency.parse_args(["--device", "cpu", "--model", "tiny"])
    assert args.variants == ["prune-less", "pruned", "ToMe", "DSAP"]
    assert "pruned/triton left out: the Triton map needs Triton and a CUDA device (here: cpu)" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is there")
def test_missing_device_exits_2_naming_it(gpu_latency, capsys):
    with pytest.raises(SystemExit) as exit:
        gpu_latency.parse_args(["--model", "tiny"])
    assert exit.value.code == 2
    assert "device 'cuda' is not available here" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [(["--modes", "fast"], "--modes fast"),
                                          (["--variants", "pruned,SDPA"], "--variants SDPA"),
                                          (["--tome-keep", "0.1"], "--tome-keep 0.1 is outside"),
                                          (["--model", "sdxl-huge"], "unknown model config 'sdxl-huge'")])
def test_bad_arguments_exit_2(gpu_latency, capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        gpu_latency.parse_args(["--device", "cpu", "--model", "tiny", *argv])
    assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_smoke_run_compiled(gpu_latency, tmp_path):
    torch._dynamo.reset()
    try:
        assert gpu_latency.main([*SMOKE, "--modes", "compiled", "--compile-backend", "eager", "--json",
                               str(tmp_path / "report.json")]) == 0
    finally:
        torch._dynamo.reset()
    _check_report(tmp_path / "report.json", "compiled", triton_map.available("cpu"))


def test_a_variant_that_fails_is_reported_and_the_others_are_timed(gpu_latency, tmp_path, monkeypatch, capsys):
    from atedm_compile import ops

    def broken(*args, **kwargs):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(triton_map, "available", lambda device: True)
    monkeypatch.setattr(ops.attention, "attention_with_map_triton", broken)
    argv = [*SMOKE, "--modes", "eager", "--variants", "pruned,pruned/triton", "--json", str(tmp_path / "r.json")]
    assert gpu_latency.main(argv) == 1
    results = json.loads((tmp_path / "r.json").read_text())["modes"]["eager"]
    assert results["pruned/triton"] == {"error": "RuntimeError: kernel launch failed"}
    assert results["full"]["ms"] > 0 and results["pruned"]["ms"] > 0
    assert "eager     pruned/triton failed: RuntimeError: kernel launch failed" in capsys.readouterr().out


def test_targets_read_memory_off_the_eager_rows_under_cuda_graphs(gpu_latency, capsys):
    # Under CUDA graphs a call allocates nothing (one pool, set aside when recorded): the compiled
    # rows' peaks say nothing, so the memory target is read off the eager ones.
    def rows(full_ms, pruned_ms, full_mib, pruned_mib):
        return {"full": {"ms": full_ms, "peak_mib": full_mib}, "pruned": {"ms": pruned_ms, "peak_mib": pruned_mib},
                "DSAP": {"full": 50 * full_ms, "DSAP": 50 * full_ms / 1.4}}

    report = {"tmacs": {"full": 6.7, "pruned": 4.1}, "cuda_graphs": True,
              "modes": {"eager": rows(100.0, 70.0, 5300.0, 5400.0), "compiled": rows(80.0, 53.0, 5000.0, 5000.0)}}
    gpu_latency.print_targets(report)
    out = capsys.readouterr().out
    assert "pruned phase efficiency 0.924 (speed-up 1.509x), target >= 0.90: met" in out
    assert "peak memory pruned (eager) 5400 MiB vs full 5300 MiB: NOT met" in out
    assert "(compiled)" not in out
    assert "sampling loop speed-up 1.400x, target >= 1.35x: met" in out
    report["cuda_graphs"] = False
    gpu_latency.print_targets(report)
    assert "peak memory pruned (compiled) 5000 MiB vs full 5000 MiB: met" in capsys.readouterr().out
