"""`train_net.py --num-gpus 2` on a CPU-only machine: two Gloo processes through detectron2's
launch, gradients synchronised by DDP (the first update equals one process's on the same data),
evaluation gathered from both ranks, AP equal to a single-process evaluation. Two machines
(`--num-machines 2`) simulated on one host, sharing an empty datasets folder."""

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
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


# train_net.py as run on one machine, with a small libra_shapes (the launcher generates it) and the
# final weights of every rank saved to OUTPUT_DIR/rank<r>.pth (detectron2 checkpoints only rank
# 0's). The patches are at module level, so detectron2's spawned workers, which import this file
# as __mp_main__, have them too. The launchers of the machines start together: each waits for
# the other's ready file.
_MACHINE = """
import os, sys, time
import torch
import detectron2.utils.comm as comm
import train_net
from libra_d2.data import shapes

shapes.SHAPES_SPLITS.update(train={"num_images": 16, "seed": 1}, val={"num_images": 4, "seed": 2})
train = train_net.Trainer.train

def train_and_save(self):
    result = train(self)
    model = getattr(self.model, "module", self.model)
    torch.save(model.state_dict(), os.path.join(self.cfg.OUTPUT_DIR, f"rank{comm.get_rank()}.pth"))
    return result

train_net.Trainer.train = train_and_save

if __name__ == "__main__":
    ready = os.path.join(os.path.dirname(__file__), "ready")
    open(f"{ready}.{sys.argv[sys.argv.index('--machine-rank') + 1]}", "w").close()
    while not (os.path.exists(f"{ready}.0") and os.path.exists(f"{ready}.1")):
        time.sleep(0.01)
    train_net.invoke_main()
"""


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_machines_on_an_empty_shared_datasets_folder(tmp_path):
    """`train_net.py --num-machines 2 --machine-rank 0|1` on one host, both launchers started at
    once on an empty DETECTRON2_DATASETS: the built-in dataset is generated once (one machine
    generates, the other waits and reuses it), both ranks train and evaluate, exit 0 and end with
    the same weights, those of rank 0's final checkpoint."""
    machine = tmp_path / "machine.py"
    machine.write_text(_MACHINE)
    out = tmp_path / "out"
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "datasets"),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # fmt: skip
    url = f"tcp://127.0.0.1:{_free_port()}"
    logs = [tmp_path / f"machine{rank}.log" for rank in (0, 1)]
    outputs = [log.open("w") for log in logs]
    procs = [
        subprocess.Popen(
            [sys.executable, str(machine), "--num-machines", "2", "--machine-rank", str(rank),
             "--num-gpus", "1", "--dist-url", url, "--config-file", LIBRA_SHAPES,
             "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
             "DATALOADER.NUM_WORKERS", "0", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
             "OUTPUT_DIR", str(out)],
            cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the launcher and its worker
        )
        for rank, output in enumerate(outputs)
    ]  # fmt: skip
    for output in outputs:
        output.close()  # the machines write to their own copies
    # A rank that fails leaves the other waiting for it (detectron2's timeout is 30 minutes).
    deadline = time.time() + 300
    while time.time() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    logs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)

    assert sum(log.count("Generating libra_shapes") for log in logs) == 2  # train and val, once
    assert "on 2 devices" in (out / "log.txt").read_text()  # evaluation gathered from both ranks
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    for rank in (0, 1):
        weights = torch.load(out / f"rank{rank}.pth", weights_only=True)
        assert weights.keys() == final.keys()
        for k, v in final.items():
            assert torch.equal(weights[k], v), (rank, k)
