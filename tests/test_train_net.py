"""train_net.py end to end on the shapes dataset: training through Trainer, the --eval-only round
trip, --resume, and one-line errors for bad input."""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import LVISEvaluator
from test_instance_segmentation import _gt_as_predictions, lvis_val  # noqa: F401  (a fixture)

import train_net
from libra_d2 import checks, evaluation
from libra_d2.checks import SetupError, check_coco_json, check_device

ROOT = Path(__file__).resolve().parents[1]
LIBRA_SHAPES = str(ROOT / "configs" / "libra_shapes" / "libra_faster_rcnn_R_18_FPN.yaml")
LAZY_SHAPES = LIBRA_SHAPES.replace(".yaml", ".py")
MMDET_R50 = str(ROOT / "configs" / "COCO-Detection" / "libra_faster_rcnn_R_50_FPN_1x_mmdet.yaml")
UNREACHABLE = "http://127.0.0.1:9/libra.pth"  # a closed local port: refused at once, no DNS
NOT_REGISTERED = (
    "dataset '{}' is not registered with detectron2's DatasetCatalog; register it before running "
    "(e.g. register_coco_instances) or use one of libra_shapes_train/libra_shapes_val or "
    "detectron2's builtin names (coco_2017_*)"
)


def unreachable_error(what, cache):
    """A regex of the whole error for UNREACHABLE as the option ``what``; the reason (e.g.
    "[Errno 111] Connection refused") depends on the machine."""
    return (
        re.escape(f"{what} '{UNREACHABLE}' cannot be downloaded (")
        + r"\[Errno -?\d+\] [^()]+"
        + re.escape(
            f"); download it where there is access and give the local file as {what}, or put "
            f"it in iopath's download cache '{cache}' (moved by FVCORE_CACHE) under the URL's "
            "path, where it is used offline"
        )
    )


def _args(*argv):
    return train_net.default_argument_parser().parse_args(list(argv))


def _check(*argv):
    """train_net.py's pre-flight for the command-line arguments ``argv``."""
    train_net.check_setup(_args(*argv))


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
    with pytest.raises(SetupError) as e:
        _check("--config-file", str(bad))
    assert str(e.value) == (
        f"{bad}: Non-existent config key: MODEL.BFP.REFINE_LEVELS "
        "(see libra_d2/config.py for libra keys)"
    )


def test_unregistered_dataset_is_named():
    with pytest.raises(SetupError) as e:
        _check("--config-file", LIBRA_SHAPES, "DATASETS.TRAIN", "('my_dataset',)")
    assert str(e.value) == NOT_REGISTERED.format("my_dataset")


def test_missing_coco_folder_names_path_and_env_var():
    with pytest.raises(SetupError) as e:
        _check("--config-file", LIBRA_SHAPES, "DATASETS.TEST", "('coco_2017_val',)")
    root = os.environ["DETECTRON2_DATASETS"]
    assert str(e.value) == (
        f"dataset 'coco_2017_val': json_file '{root}/coco/annotations/instances_val2017.json' "
        "does not exist; put the dataset there or set DETECTRON2_DATASETS to the folder that "
        f"holds it (now: '{root}')"
    )


def test_missing_and_corrupt_weights(tmp_path):
    with pytest.raises(SetupError) as e:
        _check("--config-file", LIBRA_SHAPES, "MODEL.WEIGHTS", str(tmp_path / "nope.pth"))
    assert str(e.value) == f"MODEL.WEIGHTS '{tmp_path / 'nope.pth'}' does not exist"
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(SetupError) as e:
        _check("--config-file", LIBRA_SHAPES, "MODEL.WEIGHTS", str(corrupt))
    assert str(e.value) == (
        f"MODEL.WEIGHTS '{corrupt}' is not a readable checkpoint "
        "(UnpicklingError: Weights only load failed)"
    )


def test_invalid_libra_value_fails_before_training():
    with pytest.raises(SetupError) as e:
        _check("--config-file", LIBRA_SHAPES, "MODEL.ROI_HEADS.IOU_BALANCED.NUM_BINS", "0")
    assert str(e.value) == (
        "MODEL.ROI_HEADS.IOU_BALANCED.NUM_BINS = 0 is out of range: it must be an integer >= 1"
    )


def test_setup_mistakes_are_one_line_errors(tmp_path, run_concurrently, one_line_error):
    """Through the real command: exit status 2, one stderr line, no traceback, the value
    and the fix named, before any worker starts. The official-weights first run, as users do it:
    evaluation with only a test set present and the weights URL unreachable (a closed local
    port)."""
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

    error = "train_net.py: error: "
    # Evaluation reads only DATASETS.TEST: the missing COCO train set is not the error.
    assert re.fullmatch(re.escape(error) + unreachable_error("MODEL.WEIGHTS", cache), line["url"])
    typo = LIBRA_SHAPES.replace("FPN", "FPM")
    assert line["typo"] == error + f"config file '{typo}' does not exist"
    assert line["dataset"] == error + NOT_REGISTERED.format("my_val")
    assert line["no_test"] == error + (
        "DATASETS.TEST is empty; name the datasets to use, e.g. DATASETS.TEST \"('my_dataset',)\""
    )
    assert line["weights"] == error + f"MODEL.WEIGHTS '{tmp_path / 'missing.pth'}' does not exist"
    assert line["output"] == error + (
        f"OUTPUT_DIR '{tmp_path / 'a_file' / 'out'}' cannot be created or written to "
        "(Not a directory); point it to a writable folder"
    )
    assert line["device"] == error + "MODEL.DEVICE 'gpu' is not a torch device; use cpu or cuda"
    assert line["lazy_key"] == error + (
        f"command-line override 'train.max_itr=3': {LAZY_SHAPES} has no key 'train.max_itr' "
        "(write '+train.max_itr=...' to add one)"
    )
    lazy_typo = LAZY_SHAPES.replace("FPN", "FPM")
    assert line["lazy_typo"] == error + f"config file '{lazy_typo}' does not exist"
    if "cuda" in line:
        assert line["cuda"] == error + (
            "MODEL.DEVICE is 'cuda' but this machine has no cuda device "
            "(torch.cuda.is_available() is False); run on the CPU with MODEL.DEVICE cpu"
        )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_set_up_mistake_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    """train_net.py's command, in this process: argparse's exit status and error line."""
    missing = tmp_path / "nope.yaml"
    monkeypatch.setattr(sys, "argv", ["train_net.py", "--config-file", str(missing)])
    with pytest.raises(SystemExit) as e:
        train_net.invoke_main()
    assert e.value.code == 2
    assert (
        capsys.readouterr().err == f"train_net.py: error: config file '{missing}' does not exist\n"
    )


def test_num_gpus_beyond_the_gpus_present(monkeypatch):
    """With CUDA, each worker takes one GPU; without, --num-gpus N on cpu runs N Gloo processes
    (tests/test_distributed.py)."""
    check_device("cpu", num_processes=4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda", num_processes=2)
    with pytest.raises(SetupError) as e:
        check_device("cuda", num_processes=4)
    assert str(e.value) == (
        "--num-gpus 4 but this machine has 2 CUDA GPU(s); use --num-gpus 2 or fewer"
    )
    with pytest.raises(SetupError) as e:
        check_device("cuda:2")
    assert str(e.value) == (
        "MODEL.DEVICE is 'cuda:2' but this machine has 2 CUDA GPU(s); use cuda:0 to cuda:1"
    )


def test_eval_only_checks_only_the_test_sets():
    """The COCO configs name coco_2017_train; evaluating on a present test set does not need it
    (training does)."""
    argv = ["--config-file", MMDET_R50, "DATASETS.TEST", "('libra_shapes_val',)",
            "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]  # fmt: skip
    _check("--eval-only", *argv)
    with pytest.raises(SetupError) as e:
        _check(*argv)
    root = os.environ["DETECTRON2_DATASETS"]
    assert str(e.value) == (
        f"dataset 'coco_2017_train': json_file '{root}/coco/annotations/instances_train2017.json'"
        " does not exist; put the dataset there or set DETECTRON2_DATASETS to the folder that "
        f"holds it (now: '{root}')"
    )


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
    where = f"dataset 'small' ({path})"

    def error(bad):
        with pytest.raises(SetupError) as e:
            check_coco_json(_write(path, bad), image_root, "small")
        return str(e.value)

    bad = json.loads(json.dumps(coco))
    bad["images"][1]["file_name"] = "missing.png"
    im_id = bad["images"][1]["id"]
    missing = os.path.join(image_root, "missing.png")
    assert error(bad) == f"{where}: image id {im_id}: file '{missing}' does not exist"

    bad = json.loads(json.dumps(coco))
    bad["annotations"][2]["category_id"] = 99
    ann = bad["annotations"][2]
    categories = sorted(c["id"] for c in coco["categories"])
    assert error(bad) == (
        f"{where}: annotation id {ann['id']} (image id {ann['image_id']}): unknown category_id 99;"
        f" the file's categories are {categories}"
    )

    bad = json.loads(json.dumps(coco))
    bad["annotations"][0]["bbox"] = [1, 2, 3]
    ann = bad["annotations"][0]
    assert error(bad) == (
        f"{where}: annotation id {ann['id']} (image id {ann['image_id']}): malformed bbox "
        "[1, 2, 3]; expected [x, y, w >= 0, h >= 0]"
    )

    bad = json.loads(json.dumps(coco))
    bad["annotations"][0]["image_id"] = -1
    ann = bad["annotations"][0]
    assert error(bad) == (
        f"{where}: annotation id {ann['id']} (image id -1): its image_id is not in 'images'"
    )

    path.write_text("{not json")
    with pytest.raises(SetupError) as e:
        check_coco_json(str(path), image_root, "small")
    assert str(e.value) == (
        f"{where}: not a COCO instances file (JSONDecodeError: Expecting property name "
        "enclosed in double quotes: line 1 column 2 (char 1))"
    )


@pytest.fixture
def bad_coco_dataset(small_coco):
    """A registered COCO dataset whose first annotation has the unknown category_id 42."""
    from detectron2.data.datasets import register_coco_instances

    path, coco, image_root = small_coco
    coco["annotations"][0]["category_id"] = 42
    name = f"libra_test_bad_coco_{path.parent.name}"
    register_coco_instances(name, {}, _write(path, coco), image_root)
    yield name, coco["annotations"][0]
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_pre_flight_checks_registered_coco_files(bad_coco_dataset):
    name, ann = bad_coco_dataset
    with pytest.raises(SetupError) as e:
        _check("--config-file", LIBRA_SHAPES, "DATASETS.TEST", f"('{name}',)")
    json_file = MetadataCatalog.get(name).json_file
    assert str(e.value).startswith(
        f"dataset '{name}' ({json_file}): annotation id {ann['id']} (image id {ann['image_id']}): "
        "unknown category_id 42; "
    )


def test_pre_flight_leaves_large_coco_files_to_detectron2(bad_coco_dataset, monkeypatch):
    """A COCO file above the size bound (COCO train's is ~450 MB) is not read before running:
    detectron2's loader reads it once, in the job."""
    name, _ = bad_coco_dataset
    size = os.path.getsize(MetadataCatalog.get(name).json_file)
    monkeypatch.setattr(checks, "_COCO_CHECK_MAX_BYTES", size - 1)
    _check("--config-file", LIBRA_SHAPES, "DATASETS.TEST", f"('{name}',)")  # not read: no error


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
    with pytest.raises(SetupError) as e:
        _check("--config-file", fast)
    assert str(e.value) == (
        "MODEL.LOAD_PROPOSALS is True but DATASETS.PROPOSAL_FILES_TRAIN has 0 file(s) for the 1 "
        "dataset(s) of DATASETS.TRAIN ('libra_shapes_train',); give one proposal file per "
        "dataset (see dump_proposals.py)"
    )
    nope = tmp_path / "nope.pkl"
    with pytest.raises(SetupError) as e:
        _check(
            "--config-file", fast,
            "DATASETS.PROPOSAL_FILES_TRAIN", f"('{nope}',)",
            "DATASETS.PROPOSAL_FILES_TEST", f"('{nope}',)",
        )  # fmt: skip
    assert str(e.value) == f"proposal file '{nope}' does not exist"


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


USER_LAZY_CONFIG = """
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.data.datasets import load_coco_json

_shapes = LazyConfig.load({shapes!r})
model, optimizer, lr_multiplier, train = (
    _shapes.model, _shapes.optimizer, _shapes.lr_multiplier, _shapes.train
)
dataloader = _shapes.dataloader
dataloader.train.dataset = L(load_coco_json)(
    json_file={json_file!r}, image_root={image_root!r}, dataset_name={name!r}
)
del dataloader.evaluator
"""


def test_user_lazy_config_without_evaluator_and_with_own_dataset_function_trains(
    tiny_train, tmp_path, monkeypatch
):
    """Through train_net.py's command (pre-flight, launch, training): a LazyConfig whose training
    set comes from the user's own function (no dataset names to check) and that has no
    ``dataloader.evaluator`` (nothing to evaluate, as in detectron2's lazyconfig_train_net.py)
    trains to the end."""
    meta = MetadataCatalog.get(tiny_train)
    config = tmp_path / "user_config.py"
    files = {"json_file": meta.json_file, "image_root": meta.image_root, "name": tiny_train}
    config.write_text(USER_LAZY_CONFIG.format(shapes=LAZY_SHAPES, **files))
    out = tmp_path / "out"
    overrides = [
        "train.max_iter=2",
        f"train.output_dir={out}",
        "train.log_period=1",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
    ]
    monkeypatch.setattr(sys, "argv", ["train_net.py", "--config-file", str(config), *overrides])
    torch.manual_seed(0)
    train_net.invoke_main()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    records = _metrics(out)
    assert [r["iteration"] for r in records if "total_loss" in r] == [0, 1]
    assert not [k for r in records for k in r if k.startswith("bbox")]


def test_lazy_config_lvis_evaluator_evaluates(lvis_val, tmp_path):  # noqa: F811  (fixture)
    """A LazyConfig's ``L(LVISEvaluator)``, not built by Trainer.build_evaluator, evaluates with
    lvis 0.5.3 on numpy >= 1.24 (libra_d2/evaluation.py): the ground truth as predictions scores
    AP 100."""
    evaluator = L(LVISEvaluator)(dataset_name=lvis_val, tasks=("bbox",), output_dir=str(tmp_path))
    evaluator = instantiate(evaluator)
    evaluator.reset()
    for inp, out in zip(*_gt_as_predictions(lvis_val)):
        evaluator.process([inp], [out])
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)


def test_lvis_alias_only_while_lvis_lacks_the_fix(monkeypatch):
    monkeypatch.delattr(np, "float", raising=False)
    for release, needed in [("0.5.3", True), ("0.5.4", False), ("1.0", False)]:
        monkeypatch.setattr(evaluation, "version", lambda name: release)
        assert evaluation.lvis_needs_np_float() is needed, release
    monkeypatch.setattr(np, "float", float, raising=False)  # a numpy that has it
    monkeypatch.setattr(evaluation, "version", lambda name: "0.5.3")
    assert evaluation.lvis_needs_np_float() is False
