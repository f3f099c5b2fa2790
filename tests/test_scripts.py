"""The user-facing scripts: benchmarks/bench_sampler.py, benchmarks/plot_sampling.py,
benchmarks/plot_curves.py and demo.py — argument handling and tiny runs that write their files
(benchmarks/bench_libra.py: tests/test_bench_libra.py); the one-line set-up errors of demo.py,
export_model.py, dump_proposals.py and convert_mmdet_checkpoint.py and the official-weights URL
served from detectron2's download cache without a network."""

import importlib.util
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from test_train_net import UNREACHABLE, unreachable_error

from libra_d2.checks import load_config

ROOT = Path(__file__).resolve().parents[1]
SHAPES_LIBRA = str(ROOT / "configs" / "libra_shapes" / "libra_faster_rcnn_R_18_FPN.yaml")
SHAPES_FASTER = str(ROOT / "configs" / "libra_shapes" / "faster_rcnn_R_18_FPN.yaml")


def _load(relpath):
    """Import a script by path under a private module name."""
    path = ROOT / relpath
    name = "script_" + path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_sampler():
    return _load("benchmarks/bench_sampler.py")


@pytest.fixture(scope="module")
def plot_sampling():
    return _load("benchmarks/plot_sampling.py")


@pytest.fixture(scope="module")
def plot_curves():
    return _load("benchmarks/plot_curves.py")


@pytest.fixture(scope="module")
def demo():
    return _load("demo.py")


def _exit_code(fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    return e.value.code


# ---------------------------------------------------------------------------------------------
# Argument handling
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["bench_sampler", "plot_sampling", "plot_curves", "demo"])
def test_help_in_process(script, request, capsys):
    module = request.getfixturevalue(script)
    assert _exit_code(module.main, ["--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def _last_line(capsys):
    """The last stderr line (argparse's own errors come after a usage message)."""
    return capsys.readouterr().err.splitlines()[-1]


def test_plot_sampling_bad_arguments(plot_sampling, capsys):
    assert _exit_code(plot_sampling.main, ["--num-images", "0"]) == 2
    assert _last_line(capsys) == (
        "plot_sampling.py: error: argument --num-images: must be >= 1, got 0"
    )
    argv = ["--config-file", SHAPES_LIBRA, "--dataset", "no_such_dataset"]
    assert _exit_code(plot_sampling.main, argv) == 2
    assert capsys.readouterr().err == (
        "plot_sampling.py: error: dataset 'no_such_dataset' is not registered with detectron2's "
        "DatasetCatalog\n"
    )
    argv = ["--config-file", SHAPES_LIBRA, "MODEL.NO_SUCH_KEY", "1"]
    assert _exit_code(plot_sampling.main, argv) == 2
    assert capsys.readouterr().err == (
        "plot_sampling.py: error: command-line override ['MODEL.NO_SUCH_KEY', '1']: "
        "Non-existent key: MODEL.NO_SUCH_KEY\n"
    )


def test_demo_bad_arguments(demo, tmp_path, capsys):
    assert _exit_code(demo.main, ["--input", "x.png", "--output", str(tmp_path)]) == 2
    assert _last_line(capsys) == (
        "demo.py: error: the following arguments are required: --config-file"
    )
    argv = ["--config-file", SHAPES_LIBRA, "--input", "x.png", "--output", str(tmp_path)]
    assert _exit_code(demo.main, argv + ["--confidence-threshold", "2"]) == 2
    assert _last_line(capsys) == "demo.py: error: --confidence-threshold must be in [0, 1], got 2.0"
    assert _exit_code(demo.main, argv + ["--opts", "MODEL.WEIGHTS", "nope.pth"]) == 2
    assert capsys.readouterr().err == "demo.py: error: MODEL.WEIGHTS 'nope.pth' does not exist\n"


def test_dump_proposals_set_up_mistake_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    dump_proposals = _load("dump_proposals.py")
    argv = ["dump_proposals.py", "--config-file", SHAPES_FASTER, "--dataset", "no_such_dataset",
            "--output", str(tmp_path / "p.pkl")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        dump_proposals.invoke_main()
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "dump_proposals.py: error: dataset 'no_such_dataset' is not registered with detectron2's "
        "DatasetCatalog; register it before running (e.g. register_coco_instances) or use one of "
        "libra_shapes_train/libra_shapes_val or detectron2's builtin names (coco_2017_*)"
    ]


def test_plot_curves_bad_arguments(plot_curves, tmp_path, capsys):
    assert _exit_code(plot_curves.main, []) == 2
    capsys.readouterr()
    assert _exit_code(plot_curves.main, [str(tmp_path / "missing")]) == 2
    assert _last_line(capsys) == f"plot_curves.py: error: {tmp_path / 'missing'} does not exist"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text('{"iteration": 0, "total_loss": 1.0}\n')
    argv = [str(tmp_path / "a"), "--labels", "x", "y"]
    assert _exit_code(plot_curves.main, argv) == 2
    assert _last_line(capsys) == "plot_curves.py: error: --labels: got 2 labels for 1 runs"


# ---------------------------------------------------------------------------------------------
# Tiny runs
# ---------------------------------------------------------------------------------------------
def test_bench_sampler_agrees_with_the_official_algorithm(bench_sampler, tmp_path, capsys):
    """Measured, not recomputed: with more negatives than the quota of 512, IoU-balanced
    sampling picks more hard negatives than random sampling, as many as the official algorithm
    (the port in the script); and per IoU range, on 10010 proposals (where two IoU bins overflow,
    so the fill is drawn from both), our mean counts match the official ones within the noise."""
    out = tmp_path / "sampler.json"
    argv = ["--num-proposals", "2000", "10000", "--repeats", "10", "--warmup", "1",
            "--distribution", "100", "--json", str(out)]  # fmt: skip
    assert bench_sampler.main(argv) == 0
    assert "| 2010 | ours |" in capsys.readouterr().out
    res = json.loads(out.read_text())
    for row in res["results"]:
        hard = {name: s["hard_share"] for name, s in row["samplers"].items()}
        assert hard["ours"] > hard["subsample_labels"] + 0.05
        assert hard["ours"] == pytest.approx(hard["official"], abs=0.02)

    assert [r["config"] for r in res["distribution"]] == bench_sampler.DISTRIBUTION_CONFIGS
    for r in res["distribution"]:
        ours, official = r["ours"], r["official"]
        assert sum(ours["mean"]) == pytest.approx(sum(official["mean"]))  # same count
        for m1, s1, m2, s2 in zip(ours["mean"], ours["sem"], official["mean"], official["sem"]):
            # 4 standard errors of the difference (+0.3 for ranges where both are near exact)
            assert abs(m1 - m2) <= 4 * math.hypot(s1, s2) + 0.3, (r["config"], m1, m2)


def test_plot_sampling_random_init(plot_sampling, tiny_val, tmp_path, caplog, capsys):
    png, js = tmp_path / "sampling.png", tmp_path / "sampling.json"
    argv = [
        "--config-file", SHAPES_LIBRA, "--dataset", tiny_val, "--num-images", "2",
        "--output", str(png), "--json", str(js),
    ]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert plot_sampling.main(argv) == 0
    assert caplog.messages == [
        "MODEL.WEIGHTS is empty: the proposals come from a randomly initialised RPN; pass "
        "MODEL.WEIGHTS path/to/model_final.pth to see a trained model's proposals"
    ]
    assert png.stat().st_size > 0
    res = json.loads(js.read_text())
    assert res["num_images"] == 2
    methods = res["methods"]
    assert set(methods) == {"all negatives", "random sampling", "IoU-balanced sampling"}
    assert methods["random sampling"]["count"] == methods["IoU-balanced sampling"]["count"] > 0
    for m in methods.values():
        assert 0.0 <= m["hard_share"] <= 1.0
        assert sum(m["histogram"]) == pytest.approx(1.0)
    assert "% hard (IoU > 0.05)" in capsys.readouterr().out


def test_demo_writes_images(demo, shapes_dataset, tmp_path, caplog):
    _, image_root = shapes_dataset["val"]
    images = sorted(Path(image_root).glob("*.png"))[:2]
    out = tmp_path / "out"
    argv = [
        "--config-file", SHAPES_LIBRA, "--output", str(out), "--confidence-threshold", "0.0",
        "--input", str(images[0]), str(images[1]), "--opts", "MODEL.DEVICE", "cpu",
    ]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert demo.main(argv) == 0
    assert "MODEL.WEIGHTS is empty: the detector is randomly initialised" in caplog.messages
    assert sorted(p.name for p in out.iterdir()) == sorted(p.stem + ".png" for p in images)


def test_scripts_report_setup_mistakes_in_one_line_and_use_cached_weights_offline(
    shapes_dataset, tmp_path, run_concurrently, one_line_error
):
    """Through the real commands, concurrently: each mistake gives a non-zero exit status, one
    stderr line without traceback that names the value and the fix. An unreachable weights URL
    (the .invalid domain never resolves) whose file is in detectron2's download cache loads from
    there, without a network."""
    _, image_root = shapes_dataset["val"]
    image = str(sorted(Path(image_root).glob("*.png"))[0])
    (tmp_path / "a_file").write_text("")
    (tmp_path / "text.jpg").write_text("not an image")
    cache = tmp_path / "cache"  # detectron2's download cache, with one file in it
    cached_url, cached = "https://weights.invalid/zoo/libra.pth", cache / "zoo" / "libra.pth"
    cached.parent.mkdir(parents=True)
    torch.save({"model": build_model(load_config(SHAPES_LIBRA)).state_dict()}, cached)
    py = sys.executable
    demo = [py, str(ROOT / "demo.py"), "--config-file", SHAPES_LIBRA, "--output", str(tmp_path)]
    cases = {
        "demo_url": [*demo, "--input", image, "--opts", "MODEL.WEIGHTS", UNREACHABLE],
        "demo_missing": [*demo, "--input", str(tmp_path / "photo.jpg")],
        "demo_not_image": [*demo, "--input", str(tmp_path / "text.jpg")],
        "demo_output": [*demo[:-1], str(tmp_path / "a_file"), "--input", image],
        "export_url": [py, str(ROOT / "export_model.py"), "--config-file", SHAPES_LIBRA,
                       "--output", str(tmp_path / "export"), "MODEL.WEIGHTS", UNREACHABLE],
        "dump_url": [py, str(ROOT / "dump_proposals.py"), "--config-file", SHAPES_FASTER,
                     "--dataset", "libra_shapes_val", "--output", str(tmp_path / "p.pkl"),
                     "MODEL.WEIGHTS", UNREACHABLE],
        "convert_url": [py, str(ROOT / "convert_mmdet_checkpoint.py"), UNREACHABLE,
                        str(tmp_path / "model.pth")],
    }  # fmt: skip
    offline = [*demo[:-1], str(tmp_path / "drawn"), "--input", image,
               "--opts", "MODEL.WEIGHTS", cached_url]  # fmt: skip
    env = {**os.environ, "FVCORE_CACHE": str(cache)}
    results = run_concurrently([*cases.values(), offline], env=env, cwd=tmp_path)
    line = {
        name: one_line_error(result, Path(cmd[1]).name)
        for (name, cmd), result in zip(cases.items(), results)
    }
    for name in ("demo_url", "export_url", "dump_url", "convert_url"):
        prog = Path(cases[name][1]).name
        what = "IN" if name == "convert_url" else "MODEL.WEIGHTS"
        pattern = re.escape(f"{prog}: error: ") + unreachable_error(what, cache)
        assert re.fullmatch(pattern, line[name]), line[name]
    assert line["demo_missing"] == (
        f"demo.py: error: image '{tmp_path / 'photo.jpg'}' does not exist; check the path "
        "(quote glob patterns)"
    )
    assert line["demo_not_image"] == (
        f"demo.py: error: '{tmp_path / 'text.jpg'}' is not a readable image file "
        "(UnidentifiedImageError); give a JPEG or PNG file"
    )
    assert line["demo_output"] == (
        f"demo.py: error: --output '{tmp_path / 'a_file'}' cannot be created or written to "
        "(File exists); point it to a writable folder"
    )

    returncode, _, err = results[-1]
    assert returncode == 0, err
    assert f"INFO libra_d2.checks: MODEL.WEIGHTS '{cached_url}' is '{cached}'" in err.splitlines()
    assert "randomly initialised" not in err
    assert (tmp_path / "drawn" / (Path(image).stem + ".png")).is_file()


def _write_metrics(path, num_iters, with_eval, scale):
    lines = []
    for it in range(19, num_iters, 20):
        losses = {
            k: scale * (1.0 + i) / (1 + it / 50)
            for i, k in enumerate(["loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"])
        }
        lines.append(dict(iteration=it, total_loss=sum(losses.values()), lr=0.02, **losses))
    if with_eval:
        lines[-1].update({"bbox/AP": 30.0 * scale, "bbox/AP50": 50.0 * scale, "bbox/AP75": 31.0})
        lines.append({"iteration": 39, "bbox/AP": 20.0, "bbox/AP50": 40.0, "bbox/AP75": 21.0})
    path.mkdir(parents=True)
    text = "\n".join(json.dumps(x) for x in lines) + "\n\nnot json\n"
    (path / "metrics.json").write_text(text)


def test_plot_curves_two_runs(plot_curves, tmp_path, capsys):
    _write_metrics(tmp_path / "baseline", 100, with_eval=True, scale=1.0)
    _write_metrics(tmp_path / "libra", 120, with_eval=False, scale=0.8)
    png = tmp_path / "curves.png"
    argv = [str(tmp_path / "baseline"), str(tmp_path / "libra"), "--output", str(png)]
    assert plot_curves.main(argv + ["--smooth", "2"]) == 0
    assert png.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "baseline (last iteration 99)" in printed and "bbox/AP 30.00" in printed
    assert "libra (last iteration 119)" in printed and "no evaluation" in printed

    runs = [plot_curves.read_metrics(tmp_path / r / "metrics.json") for r in ("baseline", "libra")]
    its, ap = runs[0]["bbox/AP"]
    assert its.tolist() == [39, 99] and ap.tolist() == [20.0, 30.0]
    assert "bbox/AP" not in runs[1]
