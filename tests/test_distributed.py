"""`train_net.py --num-gpus 2` on a CPU-only machine: two Gloo processes through detectron2's
launch, evaluation gathered from both ranks, AP equal to a single-process evaluation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRA_SHAPES = str(ROOT / "configs" / "libra_shapes" / "libra_faster_rcnn_R_18_FPN.yaml")


def _ap_line(log_txt):
    """The "AP,AP50,AP75,APs,APm,APl" values detectron2 logs after an evaluation."""
    lines = [line for line in Path(log_txt).read_text().splitlines() if "copypaste: " in line]
    return [float(x) for x in lines[-1].split("copypaste: ")[1].split(",")]


def _detections(folder):
    dets = json.loads((Path(folder) / "inference" / "coco_instances_results.json").read_text())
    return sorted(
        (d["image_id"], d["category_id"], round(d["score"], 4), *[round(x, 2) for x in d["bbox"]])
        for d in dets
    )


@pytest.mark.slow
def test_two_process_cpu_training_and_gathered_evaluation(shapes_dataset, tmp_path):
    out = tmp_path / "ddp"
    common = [
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.BASE_LR", "0.01", "SEED", "7", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
    ]  # fmt: skip
    train = subprocess.run(
        [sys.executable, str(ROOT / "train_net.py"), "--num-gpus", "2", "--dist-url", "auto",
         "--config-file", LIBRA_SHAPES, *common, "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert "on 2 devices" in log  # detectron2's inference_on_dataset ran on both ranks

    single = subprocess.run(
        [sys.executable, str(ROOT / "train_net.py"), "--eval-only", "--config-file", LIBRA_SHAPES,
         *common, "MODEL.WEIGHTS", str(out / "model_final.pth"),
         "OUTPUT_DIR", str(tmp_path / "one")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    assert _ap_line(tmp_path / "one" / "log.txt") == _ap_line(out / "log.txt")
    ddp_dets, single_dets = _detections(out), _detections(tmp_path / "one")
    assert len(ddp_dets) > 0 and ddp_dets == single_dets
