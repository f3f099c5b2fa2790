"""`train_net.py --num-gpus 2` on a CPU-only machine: two Gloo processes through detectron2's
launch, gradients synchronised by DDP (the first update equals one process's on the same data),
evaluation gathered from both ranks, AP equal to a single-process evaluation."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import detectron2.utils.comm as comm
import pytest
import torch
from detectron2.engine import launch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import train_net
from libra_d2.checks import load_config

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


class _Linear(nn.Module):
    """A detectron2-style model: a list of ``{"x": (3,), "y": (2,)}`` dicts in, the mean squared
    error of a linear layer out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 2)

    def forward(self, batched_inputs):
        x = torch.stack([d["x"] for d in batched_inputs])
        y = torch.stack([d["y"] for d in batched_inputs])
        return {"loss_mse": ((self.fc(x) - y) ** 2).mean()}


class _LinearTrainer(train_net.Trainer):
    """train_net's Trainer (DDP wrapping, optimizer, schedule, hooks) on :class:`_Linear`; the two
    samples of every batch are split over the processes (rank r reads sample r of 2 processes)."""

    @classmethod
    def build_model(cls, cfg):
        return _Linear()

    @classmethod
    def build_train_loader(cls, cfg):
        g = torch.Generator().manual_seed(0)
        samples = [{"x": torch.randn(3, generator=g), "y": torch.randn(2, generator=g)}]
        samples.append({"x": torch.randn(3, generator=g), "y": torch.randn(2, generator=g)})
        per_rank = len(samples) // comm.get_world_size()
        rank = comm.get_rank()
        return itertools.repeat(samples[rank * per_rank : (rank + 1) * per_rank])


def _train_one_step(output_dir):
    """One SGD step through train_net's Trainer; saves whether the model was wrapped in DDP and
    the updated weights to ``output_dir/rank<r>.pth``."""
    cfg = load_config(None, [
        "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "1",
        "SOLVER.BASE_LR", "0.5", "SOLVER.WARMUP_FACTOR", "1.0", "DATASETS.TEST", "()",
        "OUTPUT_DIR", output_dir,
    ])  # fmt: skip
    trainer = _LinearTrainer(cfg)
    trainer.train()
    model = trainer.model
    ddp = isinstance(model, DistributedDataParallel)
    weights = (model.module if ddp else model).state_dict()
    torch.save({"ddp": ddp, "weights": weights}, f"{output_dir}/rank{comm.get_rank()}.pth")


@pytest.mark.slow
def test_two_processes_take_the_same_first_step_as_one(tmp_path):
    """2 Gloo processes with one sample each vs 1 process with both: DDP averages the gradients,
    so both ranks end with the single-process weights (which differ from the initial ones)."""
    two, one = tmp_path / "two", tmp_path / "one"
    launch(_train_one_step, 2, dist_url="auto", args=(str(two),))
    _train_one_step(str(one))
    ranks = [torch.load(two / f"rank{r}.pth", weights_only=True) for r in (0, 1)]
    (single,) = [torch.load(one / "rank0.pth", weights_only=True)]
    assert [r["ddp"] for r in ranks] == [True, True] and single["ddp"] is False
    initial = _Linear().state_dict()
    for k, v in single["weights"].items():
        assert not torch.allclose(v, initial[k])  # the step changed every parameter
        torch.testing.assert_close(ranks[0]["weights"][k], v)
        torch.testing.assert_close(ranks[1]["weights"][k], v)
