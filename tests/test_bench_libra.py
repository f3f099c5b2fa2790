"""benchmarks/bench_libra.py: argument handling, the ratio statistics and a tiny measured run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_libra.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_libra_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_in_a_subprocess():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "--shapes" in proc.stdout and "--ablations" in proc.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--iters", "0"], "must be >= 1"),
        (["--image-size", "big"], "expected HxW"),
        (["--shapes", "--configs", "a.yaml"], "not allowed with"),
        (["--device", "tpu"], "invalid choice"),
        (["--configs", "missing.yaml"], "does not exist"),
        (["--shapes", "MODEL.RPN.NMS_THRESH"], "KEY VALUE pairs"),
    ],
)
def test_bad_arguments(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_paired_ratio_closed_form(bench):
    base = [1.0, 2.0, 4.0, 3.0]
    r = bench.paired_ratio([1.1 * t for t in base], base)  # the same ratio every round
    assert r["median"] == pytest.approx(1.1) and r["low"] == pytest.approx(1.1)
    assert r["high"] == pytest.approx(1.1)
    r = bench.paired_ratio([1.0, 2.2, 4.8, 3.0 * 1.05], base)  # ratios 1.0, 1.1, 1.2, 1.05
    assert r["median"] == pytest.approx(1.075)
    assert 1.0 <= r["low"] <= r["median"] <= r["high"] <= 1.2


def test_tiny_shapes_run(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--shapes", "--image-size", "64x96", "--batch-size", "1", "--iters", "2",
            "--infer-iters", "2", "--warmup", "0", "--memory-steps", "1", "--json", str(out),
            "MODEL.RPN.POST_NMS_TOPK_TEST", "50"]  # fmt: skip
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    base, libra = res["models"]
    assert (base["name"], libra["name"]) == ("faster_rcnn_R_18_FPN", "libra_faster_rcnn_R_18_FPN")
    assert f"| {libra['name']} |" in printed
    assert res["image_size"] == [64, 96]
    for m in res["models"]:
        assert len(m["train_ms"]) == 2 and min(m["train_ms"]) > 0
        assert len(m["inference_ms"]) == 2 and min(m["inference_ms"]) > 0
        for key in ("train_ratio", "inference_ratio"):
            assert m[key]["low"] <= m[key]["median"] <= m[key]["high"]
        assert m["train_memory_mib"] > 0  # the child's peak above its RSS before the model
    # Closed forms for the 64-channel levels p2-p6 (16x24 ... 1x2; refine level p4: 4x6): the
    # non-local block's 4 1x1 convs have C*C + C parameters each and cost 4 * HW * C^2
    # multiply-adds, theta^T phi and the weighted sum of g HW^2 * (C + C); fvcore counts one flop
    # per output element of a nearest upsampling (p5, p6 -> p4 and p4 -> p2, p3) and none for
    # adaptive max pooling.
    c, hw = 64, 4 * 6
    assert libra["params"] - base["params"] == 4 * (c * c + c)
    assert base["bfp_gflops"] == 0
    upsampled = c * (hw + hw + 16 * 24 + 8 * 12)
    expected = 4 * hw * c * c + hw * hw * 2 * c + upsampled
    assert libra["bfp_gflops"] * 1e9 == pytest.approx(expected)
    assert libra["gflops"] > base["gflops"]
