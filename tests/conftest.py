"""Shared fixtures. The shapes dataset is cached under the repository's ``datasets/`` folder
(git-ignored) unless ``DETECTRON2_DATASETS`` says otherwise: it is generated once per checkout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DETECTRON2_DATASETS", str(ROOT / "datasets"))
sys.path.insert(0, str(ROOT))  # train_net.py lives at the repository root

from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from mmdet_reference import mmdet, random_models  # noqa: E402, F401  (session fixtures)

import libra_d2  # noqa: E402  (registers libra_shapes_* under the path set above)

TINY_VAL = "libra_shapes_val_tiny"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Restore torch's thread count after each test: scripts run in-process (``--threads``) set
    it, and results compared bit for bit with another process depend on it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shapes_dataset():
    """``{split: (json_file, image_root)}`` of the generated libra_shapes dataset."""
    return libra_d2.data.ensure_shapes_dataset()


def _register_subset(name, split_files, num_images, folder):
    """Register the first ``num_images`` images of a libra_shapes split as COCO dataset ``name``."""
    if name not in DatasetCatalog:
        json_file, image_root = split_files
        with open(json_file) as f:
            coco = json.load(f)
        keep = {im["id"] for im in coco["images"][:num_images]}
        coco["images"] = [im for im in coco["images"] if im["id"] in keep]
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
        tiny = folder / "annotations.json"
        tiny.write_text(json.dumps(coco))
        register_coco_instances(name, {}, str(tiny), image_root)
    return name


@pytest.fixture(scope="session")
def tiny_val(shapes_dataset, tmp_path_factory):
    """Name of a registered COCO dataset holding the first 12 images of libra_shapes_val."""
    return _register_subset(TINY_VAL, shapes_dataset["val"], 12, tmp_path_factory.mktemp("val"))


@pytest.fixture(scope="session")
def tiny_train(shapes_dataset, tmp_path_factory):
    """Name of a registered COCO dataset holding the first 8 images of libra_shapes_train."""
    return _register_subset(
        "libra_shapes_train_tiny8", shapes_dataset["train"], 8, tmp_path_factory.mktemp("train")
    )


def short_run_opts(output_dir, test_set, max_iter=3):
    """train_net.py overrides for a few-iteration CPU run that evaluates on ``test_set``."""
    return [
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD", "2",
        "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0",
        "DATASETS.TEST", f"('{test_set}',)",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # an untrained model still outputs boxes
        "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip


@pytest.fixture(scope="session")
def short_run():
    """:func:`short_run_opts`, for tests (conftest is not importable as a module)."""
    return short_run_opts


@pytest.fixture
def trainer_at_start(monkeypatch):
    """
    Patch ``train_net.Trainer.train`` to record, when training starts (after
    ``resume_or_load``), the trainer's ``start_iter`` and a copy of its model's state dict.
    Returns the dict they are recorded in (keys ``"start_iter"`` and ``"model"``).
    """
    import train_net

    seen = {}
    train = train_net.Trainer.train

    def recording_train(self):
        seen["start_iter"] = self.start_iter
        seen["model"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return train(self)

    monkeypatch.setattr(train_net.Trainer, "train", recording_train)
    return seen


def _run_concurrently(commands, env=None, cwd=None, timeout=300):
    """
    Run ``commands`` (argv lists) as concurrent subprocesses, as a user would from a shell (the
    interpreter start, ~3-5 s for torch and detectron2, dominates each of them).

    Returns:
        list of ``(returncode, stdout, stderr)`` in the order of ``commands``.
    """
    procs = [
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
        )
        for cmd in commands
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append((proc.returncode, out, err))
    return results


def _one_line_error(result, prog):
    """The single stderr line of a command that stopped on a set-up mistake: the exit status is
    argparse's 2, stderr is exactly one ``<prog>: error: ...`` line and holds no traceback."""
    returncode, _, err = result
    lines = err.strip().splitlines()
    assert returncode == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


@pytest.fixture(scope="session")
def run_concurrently():
    """:func:`_run_concurrently`, for tests."""
    return _run_concurrently


@pytest.fixture(scope="session")
def one_line_error():
    """:func:`_one_line_error`, for tests."""
    return _one_line_error
