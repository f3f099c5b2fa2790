"""train_net.py end to end on the shapes dataset: training through Trainer, the --eval-only round
trip, --resume, and one-line errors for bad input."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import train_net
from libra_d2.checks import SetupError, check_coco_json, check_device, preflight

ROOT = Path(__file__).resolve().parents[1]
LIBRA_SHAPES = str(ROOT / "configs" / "libra_shapes" / "libra_faster_rcnn_R_18_FPN.yaml")
LAZY_SHAPES = LIBRA_SHAPES.replace(".yaml", ".py")
MMDET_R50 = str(ROOT / "configs" / "COCO-Detection" / "libra_faster_rcnn_R_50_FPN_1x_mmdet.yaml")
UNREACHABLE = "https://weights.invalid/libra.pth"  # the .invalid domain never resolves


def _args(*argv):
    return train_net.default_argument_parser().parse_args(list(argv))


def _metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_val, short_run, tmp_path_factory):
    """A 3-iteration Libra R-CNN run through train_net.main: (output_dir, its final bbox eval)."""
    out = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    train_net.main(_args("--config-file", LIBRA_SHAPES, *short_run(out, tiny_val)))
    (final_eval,) = [r for r in _metrics(out) if "bbox/AP" in r]
    return out, {k[len("bbox/") :]: v for k, v in final_eval.items() if k.startswith("bbox/")}


def test_training_leaves_metrics_events_and_checkpoint(trained):
    out, results = trained
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert list(out.glob("events.out.tfevents.*"))
    train_records = [r for r in _metrics(out) if "total_loss" in r]
    assert train_records[-1]["iteration"] == 2
    for r in train_records:
        for k in ("loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"):
            assert k in r and r[k] == r[k] and abs(r[k]) < 1e6  # finite
        assert "roi_head/neg_mean_iou" in r  # IoU-balanced ROI heads are in use
    assert set(results) >= {"AP", "AP50", "AP75"}


def test_eval_only_reproduces_the_final_evaluation(trained, tiny_val, tmp_path):
    out, results = trained
    res = train_net.main(
        _args(
            "--eval-only",
            "--config-file", LIBRA_SHAPES,
            "MODEL.WEIGHTS", str(out / "model_final.pth"),
            "DATASETS.TEST", f"('{tiny_val}',)",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
            "OUTPUT_DIR", str(tmp_path),
        )
    )  # fmt: skip
    assert res["bbox"] == pytest.approx(results, nan_ok=True)
    # Not only the AP: the detections themselves are identical.
    before = json.loads((out / "inference" / "coco_instances_results.json").read_text())
    after = json.loads((tmp_path / "inference" / "coco_instances_results.json").read_text())
    assert len(before) > 0 and before == after


def test_resume_continues_from_the_last_checkpoint(
    trained, tiny_val, short_run, tmp_path, trainer_at_start
):
    out, _ = trained
    # Copy the run (last checkpoint: iteration 2), then resume it to 5 iterations.
    for name in ("model_final.pth", "last_checkpoint"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    checkpoint = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    assert checkpoint["iteration"] == 2
    opts = [*short_run(tmp_path, tiny_val, 5), "DATASETS.TEST", "()"]
    train_net.main(_args("--resume", "--config-file", LIBRA_SHAPES, *opts))
    # Training started at iteration 3 from the checkpoint's weights.
    assert trainer_at_start["start_iter"] == 3
    resumed = trainer_at_start["model"]
    assert resumed.keys() == checkpoint["model"].keys()
    for k, v in checkpoint["model"].items():
        assert torch.equal(resumed[k], v), k
    iterations = [r["iteration"] for r in _metrics(tmp_path) if "total_loss" in r]
    assert iterations[-1] == 4
    # CHECKPOINT_PERIOD 2: iteration 3 is saved; a run from 0 would also have saved iteration 1.
    assert (tmp_path / "model_0000003.pth").is_file()
    assert not (tmp_path / "model_0000001.pth").exists()


# ------------------------------------------------------------------------- one-line errors
def test_unknown_key_in_yaml_names_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{LIBRA_SHAPES}"\nMODEL:\n  BFP:\n    REFINE_LEVELS: 2\n')
    with pytest.raises(SetupError, match=r"bad\.yaml.*MODEL\.BFP\.REFINE_LEVELS"):
        preflight(str(bad))


def test_unregistered_dataset_is_named():
    with pytest.raises(SetupError, match="dataset 'my_dataset' is not registered"):
        preflight(LIBRA_SHAPES, ["DATASETS.TRAIN", "('my_dataset',)"])


def test_missing_coco_folder_names_path_and_env_var():
    with pytest.raises(
        SetupError, match=r"coco_2017_val.*instances_val2017\.json.*DETECTRON2_DATASETS"
    ):
        preflight(LIBRA_SHAPES, ["DATASETS.TEST", "('coco_2017_val',)"])


def test_missing_and_corrupt_weights(tmp_path):
    with pytest.raises(SetupError, match=r"MODEL\.WEIGHTS '.*nope\.pth' does not exist"):
        preflight(LIBRA_SHAPES, ["MODEL.WEIGHTS", str(tmp_path / "nope.pth")])
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(SetupError, match=r"MODEL\.WEIGHTS '.*corrupt\.pth' is not a readable"):
        preflight(LIBRA_SHAPES, ["MODEL.WEIGHTS", str(corrupt)])


def test_invalid_libra_value_fails_before_training():
    with pytest.raises(SetupError, match=r"MODEL\.ROI_HEADS\.IOU_BALANCED\.NUM_BINS"):
        preflight(LIBRA_SHAPES, ["MODEL.ROI_HEADS.IOU_BALANCED.NUM_BINS", "0"])


def test_setup_mistakes_are_one_line_errors(tmp_path, run_concurrently, one_line_error):
    """Through the real command: exit status non-zero, one stderr line, no traceback, the value
    and the fix named, before any worker starts. The official-weights first run, as users do it:
    evaluation with only a test set present and the weights URL unreachable (the .invalid domain
    never resolves)."""
    (tmp_path / "a_file").write_text("")
    cache = tmp_path / "cache"
    env = {**os.environ, "FVCORE_CACHE": str(cache)}
    train_net_py = [sys.executable, str(ROOT / "train_net.py")]
    eval_val = [
        *train_net_py,
        "--eval-only",
        "--config-file",
        MMDET_R50,
        "DATASETS.TEST",
        "('libra_shapes_val',)",
        "OUTPUT_DIR",
        str(tmp_path / "out"),
    ]
    cases = {
        "url": [*eval_val, "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", UNREACHABLE],
        "typo": [*train_net_py, "--config-file", LIBRA_SHAPES.replace("FPN", "FPM")],
        "dataset": [*eval_val, "DATASETS.TEST", "('my_val',)", "MODEL.DEVICE", "cpu"],
        "no_test": [*eval_val, "DATASETS.TEST", "()", "MODEL.DEVICE", "cpu"],
        "weights": [*train_net_py, "--config-file", LIBRA_SHAPES,
                    "MODEL.WEIGHTS", str(tmp_path / "missing.pth")],
        "output": [*train_net_py, "--config-file", LIBRA_SHAPES,
                   "OUTPUT_DIR", str(tmp_path / "a_file" / "out")],
        "device": [*train_net_py, "--config-file", LIBRA_SHAPES, "MODEL.DEVICE", "gpu"],
        "lazy_key": [*train_net_py, "--config-file", LAZY_SHAPES, "train.max_itr=3"],
        "lazy_typo": [*train_net_py, "--config-file", LAZY_SHAPES.replace("FPN", "FPM")],
    }  # fmt: skip
    if not torch.cuda.is_available():
        cases["cuda"] = eval_val  # the COCO configs keep detectron2's MODEL.DEVICE cuda
    results = run_concurrently(list(cases.values()), env=env, cwd=tmp_path)
    line = dict(zip(cases, (one_line_error(r, "train_net.py") for r in results)))

    # Evaluation reads only DATASETS.TEST: the missing COCO train set is not the error.
    assert "coco_2017_train" not in line["url"]
    assert f"MODEL.WEIGHTS '{UNREACHABLE}' cannot be downloaded (" in line["url"]
    assert "give the local file as MODEL.WEIGHTS" in line["url"]
    assert f"put it at '{cache / 'libra.pth'}' (detectron2's download cache" in line["url"]
    assert line["typo"].endswith("libra_faster_rcnn_R_18_FPM.yaml' does not exist")
    assert "dataset 'my_val' is not registered" in line["dataset"]
    assert "DATASETS.TEST is empty" in line["no_test"]
    assert "MODEL.WEIGHTS" in line["weights"] and "missing.pth' does not exist" in line["weights"]
    assert f"OUTPUT_DIR '{tmp_path / 'a_file' / 'out'}' cannot be created" in line["output"]
    assert "MODEL.DEVICE 'gpu' is not a torch device; use cpu or cuda" in line["device"]
    assert (
        f"override 'train.max_itr=3': {LAZY_SHAPES} has no key 'train.max_itr'" in line["lazy_key"]
    )
    assert line["lazy_typo"].endswith("libra_faster_rcnn_R_18_FPM.py' does not exist")
    if "cuda" in line:
        assert "MODEL.DEVICE is 'cuda' but this machine has no CUDA GPU" in line["cuda"]
        assert line["cuda"].endswith("with MODEL.DEVICE cpu")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_num_gpus_beyond_the_gpus_present(monkeypatch):
    """With CUDA, each worker takes one GPU; without, --num-gpus N on cpu runs N Gloo processes
    (tests/test_distributed.py)."""
    check_device("cpu", num_processes=4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda", num_processes=2)
    with pytest.raises(SetupError, match=r"--num-gpus 4 but this machine has 2 CUDA GPU\(s\); "):
        check_device("cuda", num_processes=4)
    with pytest.raises(SetupError, match=r"MODEL.DEVICE is 'cuda:2' .* use cuda:0 to cuda:1"):
        check_device("cuda:2")


def test_eval_only_checks_only_the_test_sets():
    """The COCO configs name coco_2017_train; evaluating on a present test set does not need it
    (training does)."""
    opts = ["DATASETS.TEST", "('libra_shapes_val',)", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]
    preflight(MMDET_R50, opts, splits=("TEST",))
    with pytest.raises(SetupError, match="dataset 'coco_2017_train'"):
        preflight(MMDET_R50, opts)


@pytest.fixture
def small_coco(shapes_dataset, tmp_path):
    """A 3-image copy of libra_shapes_val's COCO file: (path, parsed dict, image_root)."""
    json_file, image_root = shapes_dataset["val"]
    coco = json.loads(Path(json_file).read_text())
    keep = {im["id"] for im in coco["images"][:3]}
    coco["images"] = [im for im in coco["images"] if im["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    return tmp_path / "small.json", coco, image_root


def _write(path, coco):
    path.write_text(json.dumps(coco))
    return str(path)


def test_coco_json_errors_name_the_file_and_the_entry(small_coco):
    path, coco, image_root = small_coco
    check_coco_json(_write(path, coco), image_root, "small")  # the intact file passes

    bad = json.loads(json.dumps(coco))
    bad["images"][1]["file_name"] = "missing.png"
    im_id = bad["images"][1]["id"]
    with pytest.raises(SetupError, match=rf"small\.json\): image id {im_id}: file .*missing\.png"):
        check_coco_json(_write(path, bad), image_root, "small")

    bad = json.loads(json.dumps(coco))
    bad["annotations"][2]["category_id"] = 99
    ann_id = bad["annotations"][2]["id"]
    with pytest.raises(SetupError, match=rf"annotation id {ann_id} .*unknown category_id 99"):
        check_coco_json(_write(path, bad), image_root, "small")

    bad = json.loads(json.dumps(coco))
    bad["annotations"][0]["bbox"] = [1, 2, 3]
    ann_id = bad["annotations"][0]["id"]
    with pytest.raises(SetupError, match=rf"annotation id {ann_id} .*malformed bbox \[1, 2, 3\]"):
        check_coco_json(_write(path, bad), image_root, "small")

    path.write_text("{not json")
    with pytest.raises(SetupError, match=r"small\.json\): not a COCO instances file"):
        check_coco_json(str(path), image_root, "small")


def test_preflight_checks_registered_coco_files(small_coco):
    from detectron2.data.datasets import register_coco_instances

    path, coco, image_root = small_coco
    coco["annotations"][0]["category_id"] = 42
    register_coco_instances("libra_test_bad_coco", {}, _write(path, coco), image_root)
    with pytest.raises(SetupError, match="libra_test_bad_coco.*unknown category_id 42"):
        preflight(LIBRA_SHAPES, ["DATASETS.TEST", "('libra_test_bad_coco',)"])


def test_diverging_training_stops_and_keeps_the_last_good_checkpoint(
    trained, tiny_val, short_run, tmp_path
):
    """Resume a good run with inputs that make every loss NaN: detectron2's FloatingPointError
    stops it and last_checkpoint still names the good, finite checkpoint."""
    out, _ = trained
    for name in ("model_final.pth", "last_checkpoint"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    args = _args(
        "--resume", "--config-file", LIBRA_SHAPES, *short_run(tmp_path, tiny_val, 6),
        "MODEL.PIXEL_STD", "[0.0, 0.0, 0.0]",  # inf inputs -> NaN losses
    )  # fmt: skip
    with pytest.raises(FloatingPointError):
        train_net.main(args)
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not list(tmp_path.glob("model_000*.pth"))  # nothing was saved after the divergence


def test_fast_rcnn_without_matching_proposal_files_fails_before_training(tmp_path):
    fast = str(ROOT / "configs" / "libra_shapes" / "libra_fast_rcnn_R_18_FPN.yaml")
    with pytest.raises(SetupError, match=r"DATASETS\.PROPOSAL_FILES_TRAIN has 0 file"):
        preflight(fast)
    with pytest.raises(SetupError, match=r"proposal file '.*nope\.pkl' does not exist"):
        preflight(
            fast,
            [
                "DATASETS.PROPOSAL_FILES_TRAIN", f"('{tmp_path / 'nope.pkl'}',)",
                "DATASETS.PROPOSAL_FILES_TEST", f"('{tmp_path / 'nope.pkl'}',)",
            ],
        )  # fmt: skip


def test_runs_with_the_same_seed_are_identical(tiny_val, short_run, tmp_path):
    """Two 2-iteration runs with SEED 3 end with identical weights; SEED 4 gives others."""

    def final_weights(run, seed):
        out = tmp_path / run
        opts = [*short_run(out, tiny_val, 2), "SEED", str(seed), "DATASETS.TEST", "()"]
        train_net.main(_args("--config-file", LIBRA_SHAPES, *opts))
        return torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]

    a, b, c = final_weights("a", 3), final_weights("b", 3), final_weights("c", 4)
    assert a.keys() == b.keys() == c.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], c[k])]
