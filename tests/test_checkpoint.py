"""Checkpoints you can trust: no code execution on load, atomic saves, resume after SIGKILL."""

import functools
import http.server
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.utils.file_io import PathManager
from torch import nn

import train_net
from libra_d2.checkpoint import LibraCheckpointer, UnsafeCheckpointError
from libra_d2.checks import SetupError, check_weights
from libra_d2.files import atomic_open

ROOT = Path(__file__).resolve().parents[1]
LIBRA_SHAPES = str(ROOT / "configs" / "libra_shapes" / "libra_faster_rcnn_R_18_FPN.yaml")


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_crafted_pickle_is_refused_without_running_it(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    with open(path, "wb") as f:
        pickle.dump({"model": {"0.weight": _Payload(marker)}, "__author__": "x"}, f)
    with pytest.raises((UnsafeCheckpointError, pickle.UnpicklingError)):
        LibraCheckpointer(_model()).load(str(path))
    with pytest.raises(SetupError) as e:  # the pre-flight refuses it as well
        check_weights(str(path))
    reason = {
        ".pkl": "UnsafeCheckpointError: refusing to load 'posix.system': checkpoints may only "
        "hold tensors, numpy arrays and plain containers",
        ".pth": "UnpicklingError: Weights only load failed",
    }[suffix]
    assert str(e.value) == f"MODEL.WEIGHTS '{path}' is not a readable checkpoint ({reason})"
    assert not marker.exists()


def test_detectron2_pkl_and_own_pth_still_load(tmp_path):
    ref = _model()
    # detectron2 model-zoo format: {"model": {name: ndarray}, "__author__": ...}
    pkl = tmp_path / "weights.pkl"
    with open(pkl, "wb") as f:
        arrays = {k: v.numpy() for k, v in ref.state_dict().items()}
        pickle.dump({"model": arrays, "__author__": "test"}, f)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    LibraCheckpointer(model).load(str(pkl))
    torch.testing.assert_close(model[0].weight, ref[0].weight)
    # ImageNet-style (Caffe2) .pkl: a flat dict of arrays with detectron2's name heuristics.
    flat = tmp_path / "flat.pkl"
    with open(flat, "wb") as f:
        pickle.dump({"conv_w": np.ones((4, 3, 3, 3), dtype=np.float32)}, f)
    check_weights(str(flat))
    # Our own checkpoints (.pth with model + iteration + optimizer state).
    ckpt = LibraCheckpointer(
        ref, save_dir=str(tmp_path), optimizer=torch.optim.SGD(ref.parameters(), 0.1)
    )
    ckpt.save("model_0000009", iteration=9)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    model = _model()
    nn.init.zeros_(model[0].weight)
    extra = LibraCheckpointer(model).load(str(tmp_path / "model_0000009.pth"))
    assert extra["iteration"] == 9
    torch.testing.assert_close(model[0].weight, ref[0].weight)
    check_weights(str(tmp_path / "model_0000009.pth"))


def _no_network(*args, **kwargs):
    raise AssertionError("the network was used")


def test_cached_weights_urls_are_used_without_a_network(tmp_path, monkeypatch):
    """detectron2:// and http(s) weights in iopath's download cache (FVCORE_CACHE) are loaded
    from there, where detectron2 itself finds them, and no request is made."""
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    url = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    cached = tmp_path / "detectron2" / "ImageNetPretrained" / "MSRA" / "R-50.pkl"
    cached.parent.mkdir(parents=True)
    with open(cached, "wb") as f:
        pickle.dump({"conv_w": np.ones((4, 3, 3, 3), dtype=np.float32)}, f, protocol=2)
    assert check_weights(url) == str(cached)
    assert PathManager.get_local_path(url) == str(cached)  # detectron2's own resolution
    cached.write_bytes(b"\x80\x02truncated")
    with pytest.raises(SetupError) as e:
        check_weights(url)
    assert str(e.value) == (
        f"MODEL.WEIGHTS '{url}' (cached as '{cached}') is not a readable checkpoint "
        "(UnpicklingError: could not find MARK)"
    )


class _QuietHTTPRequestHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def weights_server(tmp_path):
    """An HTTP server on localhost serving the folder ``tmp_path / "served"``: (url, folder)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", served
    server.shutdown()
    server.server_close()


def test_weights_url_is_downloaded_once_into_iopaths_cache(
    tmp_path, monkeypatch, weights_server, capsys
):
    """check_weights (the launcher) downloads a URL into iopath's cache; the checkpointer (the
    workers) then loads that copy without a request. A missing file is named with the server's
    answer, and nothing else is written on stderr (the error is the one line)."""
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    server, served = weights_server
    (served / "zoo").mkdir()
    ref = _model()
    torch.save({"model": ref.state_dict()}, served / "zoo" / "w.pth")
    url = f"{server}/zoo/w.pth"
    assert check_weights(url) == str(tmp_path / "cache" / "zoo" / "w.pth")
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    LibraCheckpointer(model).load(url)
    torch.testing.assert_close(model[0].weight, ref[0].weight)

    monkeypatch.undo()
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    with pytest.raises(SetupError) as e:
        check_weights(f"{server}/zoo/missing.pth", what="IN")
    assert str(e.value).startswith(
        f"IN '{server}/zoo/missing.pth' cannot be downloaded (HTTP Error 404: File not found); "
    )
    assert capsys.readouterr().err == ""  # no progress bar of the failed download


def test_atomic_open_leaves_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(str(path)) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left behind
    with atomic_open(str(path)) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"


@pytest.mark.slow
def test_sigkill_during_checkpoint_save_then_resume(shapes_dataset, tmp_path, trainer_at_start):
    """Kill a real training process while it writes a checkpoint, then --resume it."""
    out = tmp_path / "run"
    opts = [
        "SOLVER.IMS_PER_BATCH", "1", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out),
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
    ]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "train_net.py"), "--config-file", LIBRA_SHAPES]
    proc = subprocess.Popen(cmd + opts + ["SOLVER.MAX_ITER", "200"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    killed_mid_save = False
    try:
        while time.time() < deadline and proc.poll() is None:
            saves_done = (out / "last_checkpoint").exists()
            if saves_done and any(out.glob("*.pth.tmp.*")):
                proc.send_signal(signal.SIGKILL)  # a checkpoint is being written right now
                killed_mid_save = True
                break
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    assert killed_mid_save, "the training process never reached a second checkpoint save"

    last = (out / "last_checkpoint").read_text().strip()
    state = torch.load(out / last, map_location="cpu", weights_only=True)  # complete and loadable
    done = state["iteration"]
    assert last == f"model_{done:07d}.pth"

    # Resume: it must start at done + 1 from the checkpoint's weights and stop at MAX_ITER,
    # without writing any earlier checkpoint again.
    earlier = {p.name: p.stat().st_mtime_ns for p in out.glob("model_*.pth")}
    args = ["--resume", "--config-file", LIBRA_SHAPES, *opts, "SOLVER.MAX_ITER", str(done + 3)]
    train_net.main(train_net.default_argument_parser().parse_args(args))
    assert trainer_at_start["start_iter"] == done + 1
    resumed = trainer_at_start["model"]
    assert resumed.keys() == state["model"].keys()
    for k, v in state["model"].items():
        assert torch.equal(resumed[k], v), k
    assert {name: (out / name).stat().st_mtime_ns for name in earlier} == earlier
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    iterations = [r["iteration"] for r in records if "total_loss" in r]
    assert iterations[-1] == done + 2
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == done + 2
