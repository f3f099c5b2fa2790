#!/usr/bin/env python
"""
Measure what Libra R-CNN costs over Faster R-CNN, per model and per component.

In one run, for a list of configs (the first one is the baseline):

* training-step time (forward + backward + SGD step), the models alternating step by step on the
  same batches (real images of the config's first training dataset when it can be loaded,
  otherwise synthetic images with random boxes), after warm-up;
* inference time per image (batch of 1, ``torch.no_grad``), alternating likewise;
* peak memory of training, measured in a fresh child process per model: CUDA max allocated on a
  GPU; on the CPU the peak RSS of the child (``VmHWM``; ``ru_maxrss`` inherits the parent's
  high-water mark on Linux), reported in total and above the child's RSS before the model is
  built (the part the model is responsible for, which the memory ratio compares);
* parameter count and inference FLOPs (detectron2's ``FlopCountAnalysis``; fvcore counts one
  multiply-add as one flop; the non-local block's attention is counted too);

and micro-benchmarks:

* the sampler: ``iou_balanced_subsample`` vs detectron2's ``subsample_labels`` vs the official
  numpy/set algorithm (re-implemented in ``benchmarks/bench_sampler.py``) at 1k/2k/10k proposals;
* the Balanced Feature Pyramid module alone vs the ResNet + FPN backbone forward that feeds it
  (default: the COCO R-50-FPN backbone at 800x1333).

The models are built with random initialisation (``MODEL.WEIGHTS ""``, nothing is downloaded; the
statistics of frozen BN layers are set from the first batch so that activations stay finite) and
trained with a tiny learning rate (``--lr``) so that they stay near their initial state during the
measurement; the cost of a step does not depend on the value of the learning rate.

Examples::

    python benchmarks/bench_libra.py --shapes --json /tmp/bench_shapes.json     # a few minutes, CPU
    python benchmarks/bench_libra.py --device cuda --json bench_coco.json       # R-50, 800x1333
    python benchmarks/bench_libra.py --image-size 512 --iters 3 --warmup 1      # R-50, 512x853
    python benchmarks/bench_libra.py --configs a.yaml b.yaml --opts MODEL.RPN.NMS_THRESH 0.6
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))  # bench_sampler.py
# The libra_shapes splits live in the repository's datasets/ folder unless told otherwise
# (must be set before libra_d2 registers them).
os.environ.setdefault("DETECTRON2_DATASETS", str(ROOT / "datasets"))

import bench_sampler  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetMapper  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402
from detectron2.solver import build_optimizer  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.analysis import FlopCountAnalysis  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from fvcore.nn.jit_handles import get_shape  # noqa: E402

from libra_d2.checks import SetupError, load_config  # noqa: E402
from libra_d2.data import ensure_shapes_dataset, is_shapes_dataset  # noqa: E402
from libra_d2.modeling import BalancedFeaturePyramid  # noqa: E402

COCO_DIR = "configs/COCO-Detection"
SHAPES_DIR = "configs/libra_shapes"
# (role, config) of the built-in comparisons; the first one is the baseline.
PRESETS = {
    "coco": [
        ("baseline", f"{COCO_DIR}/faster_rcnn_R_50_FPN_1x.yaml"),
        ("Libra (all three)", f"{COCO_DIR}/libra_faster_rcnn_R_50_FPN_1x.yaml"),
        ("sampler only", f"{COCO_DIR}/libra_faster_rcnn_R_50_FPN_1x_sampling_only.yaml"),
        ("BFP only", f"{COCO_DIR}/libra_faster_rcnn_R_50_FPN_1x_bfp_only.yaml"),
        ("balanced L1 only", f"{COCO_DIR}/libra_faster_rcnn_R_50_FPN_1x_balanced_l1_only.yaml"),
    ],
    "shapes": [
        ("baseline", f"{SHAPES_DIR}/faster_rcnn_R_18_FPN.yaml"),
        ("Libra (all three)", f"{SHAPES_DIR}/libra_faster_rcnn_R_18_FPN.yaml"),
        ("sampler only", f"{SHAPES_DIR}/libra_faster_rcnn_R_18_FPN_sampling_only.yaml"),
        ("BFP only", f"{SHAPES_DIR}/libra_faster_rcnn_R_18_FPN_bfp_only.yaml"),
        ("balanced L1 only", f"{SHAPES_DIR}/libra_faster_rcnn_R_18_FPN_balanced_l1_only.yaml"),
    ],
}
DEFAULT_BATCH_SIZE = {"coco": 2, "shapes": 4, "custom": 2}  # images per step (per device)
# Targets of issue 5: (key in the ratios, limit) for the second config vs the baseline.
MODEL_TARGETS = [
    ("train_step", 1.05, "train step"),
    ("inference", 1.05, "inference"),
    ("memory", 1.08, "peak memory"),
]
SAMPLER_MAX_OVER_SUBSAMPLE_LABELS = 2.0
SAMPLER_MIN_SPEEDUP_OVER_OFFICIAL = 10.0
CHILD_TAG = "BENCH_LIBRA_CHILD_RESULT "
MALLOC_MMAP_THRESHOLD = 65536  # bytes, for the memory children (see measure_memory)


# ---------------------------------------------------------------------------------------------
# Arguments and configs
# ---------------------------------------------------------------------------------------------
def parse_size(text):
    """'H' or 'HxW' -> (H, W or None)."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            size = (int(parts[0]), None)
        elif len(parts) == 2:
            size = (int(parts[0]), int(parts[1]))
        else:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H or HxW (e.g. 512 or 800x1333), got {text!r}")
    if size[0] < 32 or (size[1] is not None and size[1] < 32):
        raise argparse.ArgumentTypeError(f"image sides must be >= 32, got {text!r}")
    return size


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="bench_libra.py",
        description="Time, memory and FLOPs of Libra R-CNN vs Faster R-CNN, per model and "
        "per component, plus sampler and BFP micro-benchmarks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--shapes",
        action="store_true",
        help="compare the CPU-sized libra_shapes R-18 configs (fast) instead of COCO R-50",
    )
    which.add_argument(
        "--configs",
        nargs="+",
        metavar="YAML",
        help="configs to compare; the first is the baseline, the targets apply to the second",
    )
    parser.add_argument(
        "--no-ablations",
        action="store_true",
        help="built-in comparisons: only baseline vs Libra, not the *_only ablations",
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available"
    )
    parser.add_argument(
        "--iters", type=positive_int, default=10, help="timed training steps per model"
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=2, help="untimed steps/images first"
    )
    parser.add_argument(
        "--infer-iters",
        type=positive_int,
        default=None,
        help="timed inference images per model (default: iters x batch size)",
    )
    parser.add_argument(
        "--image-size",
        type=parse_size,
        default=None,
        help="H or HxW of the input; H alone keeps the config's MAX/MIN_SIZE_TEST aspect "
        "(default: the first config's MIN_SIZE_TEST x MAX_SIZE_TEST, e.g. 800x1333)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="images per training step (default: 2 for COCO, 4 for --shapes)",
    )
    parser.add_argument(
        "--data",
        choices=["auto", "real", "synthetic"],
        default="auto",
        help="real: images of the first config's first training dataset; synthetic: random "
        "images with random boxes; auto: real if that dataset can be loaded",
    )
    parser.add_argument(
        "--num-batches", type=positive_int, default=4, help="distinct batches, cycled"
    )
    parser.add_argument("--lr", type=float, default=1e-4, help="SOLVER.BASE_LR of the timed steps")
    parser.add_argument(
        "--threads",
        type=non_negative_int,
        default=None,
        help="torch CPU threads, 0 = torch's default (default: 1 on --device cpu, where OpenMP "
        "threads are easily starved by other processes; torch's default on cuda)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skip-memory", action="store_true", help="no child processes for peak memory"
    )
    parser.add_argument(
        "--memory-steps", type=positive_int, default=3, help="training steps per memory child"
    )
    parser.add_argument(
        "--child-timeout", type=positive_int, default=1800, help="seconds per memory child"
    )
    parser.add_argument("--skip-flops", action="store_true", help="no FLOP count")
    parser.add_argument(
        "--skip-micro", action="store_true", help="no sampler / BFP micro-benchmarks"
    )
    parser.add_argument(
        "--sampler-proposals", type=positive_int, nargs="+", default=[1000, 2000, 10000]
    )
    parser.add_argument("--sampler-repeats", type=positive_int, default=100)
    parser.add_argument(
        "--sampler-threads",
        type=non_negative_int,
        default=1,
        help="torch threads during the sampler micro-benchmark (0: unchanged), as bench_sampler.py",
    )
    parser.add_argument(
        "--micro-config",
        default=PRESETS["coco"][0][1],
        help="config whose backbone (ResNet + FPN) and MODEL.BFP the BFP micro-benchmark uses",
    )
    parser.add_argument("--micro-image-size", type=parse_size, default=(800, 1333))
    parser.add_argument("--micro-iters", type=positive_int, default=5)
    parser.add_argument("--json", default=None, help="write every measurement to this file")
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides (KEY VALUE ...) applied to every model; must come last",
    )
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return parser


def resolve_path(path):
    """A config path as given, or relative to the repository root."""
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    return str(ROOT / path)


def model_list(args):
    """[(name, role, config path)] and the preset name."""
    if args.configs:
        preset = "custom"
        entries = [
            ("baseline" if i == 0 else ("target" if i == 1 else ""), c)
            for i, c in enumerate(args.configs)
        ]
    else:
        preset = "shapes" if args.shapes else "coco"
        entries = PRESETS[preset][: 2 if args.no_ablations else None]
    out, seen = [], set()
    for role, cfg in entries:
        name = Path(cfg).stem
        while name in seen:
            name += "'"
        seen.add(name)
        out.append((name, role, resolve_path(cfg)))
    return out, preset


def make_cfg(config_file, device, lr, opts):
    """detectron2 config with the libra keys, random init, on ``device``."""
    base = ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "SOLVER.BASE_LR", str(lr)]
    return load_config(config_file, base + list(opts))


def resolve_image_size(cfg, size):
    """(H, W) from --image-size and the config's test sizes."""
    min_test, max_test = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    if size is None:
        return int(min_test), int(max_test)
    h, w = size
    if w is None:
        w = int(round(h * max_test / min_test))
    return h, w


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def synthetic_image(h, w, num_classes, gen):
    """A uint8 (3, H, W) image with 3-8 filled boxes on noise, and their Instances."""
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
    n = int(torch.randint(3, 9, (1,), generator=gen))
    sizes = torch.rand(n, 2, generator=gen) * 0.45 + 0.05
    bw, bh = sizes[:, 0] * w, sizes[:, 1] * h
    x0 = torch.rand(n, generator=gen) * (w - bw)
    y0 = torch.rand(n, generator=gen) * (h - bh)
    boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)
    for b in boxes.round().int().tolist():
        color = torch.randint(0, 256, (3, 1, 1), dtype=torch.uint8, generator=gen)
        image[:, b[1] : b[3], b[0] : b[2]] = color
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.randint(num_classes, (n,), generator=gen)
    return image, inst


def load_real_dicts(cfg, num):
    """The first ``num`` annotated dataset dicts of cfg.DATASETS.TRAIN[0], or raise."""
    name = cfg.DATASETS.TRAIN[0]
    if is_shapes_dataset(name):
        ensure_shapes_dataset()
    dicts = [d for d in DatasetCatalog.get(name) if d.get("annotations")]
    if not dicts:
        raise RuntimeError(f"dataset '{name}' has no annotated image")
    return name, [dicts[i % len(dicts)] for i in range(num)]


def make_inputs(cfg, args, image_size, batch_size):
    """
    The training batches and inference inputs every model sees.

    Returns:
        batches (list[list[dict]]): ``args.num_batches`` batches of ``batch_size`` dicts with
            "image" (uint8 (3, H, W)), "height", "width", "instances" (gt_boxes, gt_classes).
        infer_inputs (list[dict]): the same images without "instances".
        source (str): where the images come from.
    """
    h, w = image_size
    num = args.num_batches * batch_size
    source = None
    if args.data in ("auto", "real"):
        try:
            name, dicts = load_real_dicts(cfg, num)
            mapper = DatasetMapper(
                cfg, is_train=True, augmentations=[T.ResizeShortestEdge(h, max(h, w))]
            )
            samples = [mapper(d) for d in dicts]
            source = f"real ({name}, resized to short side {h}, long side <= {max(h, w)})"
        except Exception as e:  # a missing dataset is expected on a machine without it
            if args.data == "real":
                raise SetupError(f"--data real: cannot load the training dataset: {e}")
            print(
                f"note: training dataset not available ({type(e).__name__}: {e}); "
                "using synthetic images"
            )
    if source is None:
        gen = torch.Generator().manual_seed(args.seed)
        samples = []
        for _ in range(num):
            image, inst = synthetic_image(h, w, cfg.MODEL.ROI_HEADS.NUM_CLASSES, gen)
            samples.append({"image": image, "height": h, "width": w, "instances": inst})
        source = f"synthetic ({h}x{w}, 3-8 random boxes per image)"
    for s in samples:  # postprocessing to the input size: the "original" size is the input's
        s["height"], s["width"] = s["image"].shape[-2:]
    batches = [samples[i * batch_size : (i + 1) * batch_size] for i in range(args.num_batches)]
    infer_inputs = [{k: s[k] for k in ("image", "height", "width")} for s in samples]
    return batches, infer_inputs, source


# ---------------------------------------------------------------------------------------------
# Model steps
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def calibrate_frozen_bn(model, batch):
    """
    Set the statistics of every ``FrozenBatchNorm2d`` of ``model``'s backbone to those of its
    input on ``batch``, layer after layer (one forward pass); return how many were set.

    A randomly initialised ResNet with frozen BN (the COCO configs, meant to start from ImageNet
    weights) otherwise overflows to inf within a few steps. Compute cost does not depend on these
    values, so the timings are those of the real model.
    """

    def hook(module, inputs):
        x = inputs[0].float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    handles = [
        m.register_forward_pre_hook(hook)
        for m in model.backbone.modules()
        if isinstance(m, FrozenBatchNorm2d)
    ]
    if handles:
        try:
            model.backbone(model.preprocess_image(batch).tensor)
        finally:
            for h in handles:
                h.remove()
    return len(handles)


class Bench:
    """A model, its optimizer and an event storage, as a training loop would hold them."""

    def __init__(self, cfg, seed, calibration_batch):
        torch.manual_seed(seed)
        self.model = build_model(cfg)
        calibrate_frozen_bn(self.model, calibration_batch)
        self.optimizer = build_optimizer(cfg, self.model)
        self.storage = EventStorage()

    def train_step(self, batch):
        self.model.train()
        with self.storage:
            loss_dict = self.model(batch)
            losses = sum(loss_dict.values())
        if not torch.isfinite(losses):
            raise FloatingPointError(f"loss became {losses.item()}: {loss_dict}")
        self.optimizer.zero_grad()
        losses.backward()
        self.optimizer.step()

    @torch.no_grad()
    def infer(self, inputs):
        self.model.eval()
        return self.model([inputs])


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def synchronizer(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def summarize(times_s):
    ms = [t * 1e3 for t in times_s]
    return dict(
        median_ms=statistics.median(ms),
        mean_ms=statistics.mean(ms),
        min_ms=min(ms),
        max_ms=max(ms),
        n=len(ms),
    )


def sdpa_flop_jit(inputs, outputs):
    """fvcore handle for aten::scaled_dot_product_attention: B*H*L*S*(E + Ev) multiply-adds."""
    q, v = get_shape(inputs[0]), get_shape(inputs[2])
    *batch, length, e = q
    s, ev = v[-2], v[-1]
    return int(np.prod(batch)) * length * s * (e + ev)


def count_flops(module, inputs):
    """(total flops, {module name: flops}) of ``module(inputs)`` (detectron2's wrapper)."""
    with warnings.catch_warnings():  # tracer and torch.jit deprecation warnings
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(module, inputs)
        analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return analysis.total(), analysis.by_module()


def model_flops(model, inputs):
    model.eval()
    with torch.no_grad():
        total, by_module = count_flops(model, [inputs])
    bfp = sum(v for k, v in by_module.items() if k.endswith(".bfp") or k == "bfp")
    return dict(gflops=total / 1e9, bfp_gflops=bfp / 1e9)


# ---------------------------------------------------------------------------------------------
# Peak memory in a child process
# ---------------------------------------------------------------------------------------------
def _proc_status_mib(field):
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in MiB, or None without procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Reset this process's RSS high-water mark (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib():
    """
    Peak resident set size of this process, MiB.

    ``VmHWM`` of /proc/self/status where available: on Linux, ``getrusage().ru_maxrss`` of a
    freshly started child also holds the high-water mark of the parent's memory image it was
    forked from (it survives ``exec``), which would make every child look as big as the parent.
    """
    hwm = _proc_status_mib("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_child(spec):
    """Build one model, run a few training steps (and inference), return its peak memory."""
    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])
    cfg = make_cfg(spec["config"], spec["device"], spec["lr"], spec["opts"])
    inputs = torch.load(spec["inputs_file"], weights_only=False)
    batches, infer_inputs = inputs["batches"], inputs["infer_inputs"]
    cuda = torch.device(spec["device"]).type == "cuda"
    out = {}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        out["rss_before_model_mib"] = _proc_status_mib("VmRSS") or peak_rss_mib()
        out["peak_reset"] = reset_peak_rss()
    bench = Bench(cfg, spec["seed"], batches[0])
    for i in range(spec["steps"]):
        bench.train_step(batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize()
        out["train_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        bench.optimizer.zero_grad()
        torch.cuda.reset_peak_memory_stats()
        for i in range(2):
            bench.infer(infer_inputs[i % len(infer_inputs)])
        torch.cuda.synchronize()
        out["infer_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["measure"] = "cuda_max_allocated"
    else:
        out["train_peak_mib"] = peak_rss_mib()
        out["train_peak_above_start_mib"] = out["train_peak_mib"] - out["rss_before_model_mib"]
        out["measure"] = "cpu_peak_rss"
        out["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    return out


def measure_memory(name, config, inputs_file, args):
    """Run :func:`run_child` for one model in a fresh interpreter; its result or an error."""
    spec = dict(
        config=config,
        device=args.device,
        lr=args.lr,
        opts=args.opts,
        inputs_file=inputs_file,
        seed=args.seed,
        threads=args.threads,
        steps=args.memory_steps,
    )
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)]
    env = dict(os.environ)
    # A fixed glibc mmap threshold: big tensors are mmapped and unmapped when freed, so the RSS
    # follows the live allocations instead of glibc's adaptive heap (which made the peak of two
    # identical models differ by ~10%). No effect on CUDA memory or non-glibc platforms.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MALLOC_MMAP_THRESHOLD))
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.child_timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {args.child_timeout} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CHILD_TAG):
            return json.loads(line[len(CHILD_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(error=f"child for {name} exited {proc.returncode}: " + " | ".join(tail))


def memory_value(mem):
    """The number the memory target is checked on: CUDA max allocated, or RSS above start."""
    if not mem or "error" in mem:
        return None
    if mem["measure"] == "cuda_max_allocated":
        return mem["train_peak_mib"]
    return mem["train_peak_above_start_mib"]


# ---------------------------------------------------------------------------------------------
# Micro-benchmarks
# ---------------------------------------------------------------------------------------------
def bench_samplers(args, sync):
    """iou_balanced_subsample vs subsample_labels vs the official algorithm (bench_sampler.py)."""
    threads = torch.get_num_threads()
    if args.sampler_threads > 0:
        torch.set_num_threads(args.sampler_threads)
    ns, pf = 512, 0.25
    methods = bench_sampler.sampler_methods(ns, pf)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    rows = []
    try:
        for n in args.sampler_proposals:
            images = [
                bench_sampler.make_inputs(n, 10, args.device, args.seed * 1000 + i)
                for i in range(4)
            ]
            times = bench_sampler.time_rounds(
                list(methods),
                lambda name, it: methods[name](images[it % len(images)]),
                max(1, args.sampler_repeats // 10),
                args.sampler_repeats,
                sync,
            )
            med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
            rows.append(
                dict(
                    num_proposals=n + 10,
                    median_us=med,
                    ours_over_subsample_labels=med["ours"] / med["subsample_labels"],
                    official_over_ours=med["official"] / med["ours"],
                )
            )
    finally:
        torch.set_num_threads(threads)
    return dict(
        threads=args.sampler_threads or threads, num_samples=ns, positive_fraction=pf, rows=rows
    )


def bench_bfp(args, sync):
    """The BFP module alone vs the ResNet + FPN forward whose outputs it takes."""
    cfg = make_cfg(resolve_path(args.micro_config), args.device, args.lr, args.opts)
    h, w = resolve_image_size(cfg, args.micro_image_size)
    torch.manual_seed(args.seed)
    backbone = build_backbone(cfg).to(args.device).eval()
    div = backbone.size_divisibility
    ph, pw = (h + div - 1) // div * div, (w + div - 1) // div * div
    x = torch.randn(1, 3, ph, pw, device=args.device)
    with torch.no_grad():
        feats = backbone(x)
    names = list(backbone.output_shape())
    levels = [feats[k] for k in names]
    bfp = (
        BalancedFeaturePyramid(
            levels[0].shape[1], len(levels), cfg.MODEL.BFP.REFINE_LEVEL, cfg.MODEL.BFP.REFINE_TYPE
        )
        .to(args.device)
        .eval()
    )
    fns = {"fpn_backbone": lambda: backbone(x), "bfp": lambda: bfp(levels)}
    with torch.no_grad():
        times = bench_sampler.time_rounds(
            list(fns), lambda name, it: fns[name](), 1, args.micro_iters, sync
        )
    out = dict(
        config=args.micro_config,
        backbone=cfg.MODEL.BACKBONE.NAME,
        depth=cfg.MODEL.RESNETS.DEPTH,
        input_size=[h, w],
        padded_size=[ph, pw],
        levels={k: list(feats[k].shape) for k in names},
        refine_level=cfg.MODEL.BFP.REFINE_LEVEL,
        refine_type=cfg.MODEL.BFP.REFINE_TYPE,
        bfp_params=sum(p.numel() for p in bfp.parameters()),
        fpn_backbone_params=sum(p.numel() for p in backbone.parameters()),
        time={k: summarize(v) for k, v in times.items()},
    )
    out["bfp_over_fpn_backbone"] = (
        out["time"]["bfp"]["median_ms"] / out["time"]["fpn_backbone"]["median_ms"]
    )
    if not args.skip_flops:
        with torch.no_grad():
            out["fpn_backbone_gflops"] = count_flops(backbone, (x,))[0] / 1e9
            out["bfp_gflops"] = count_flops(bfp, (levels,))[0] / 1e9
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def fmt(value, spec=".1f", missing="n/a"):
    return missing if value is None else format(value, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def met(value, limit, le=True):
    if value is None:
        return "not measured"
    return "met" if (value <= limit if le else value >= limit) else "NOT met"


def print_report(res):
    env = res["environment"]
    print(
        f"\n## Libra R-CNN cost benchmark ({res['preset']})\n\n"
        f"device={env['device']} ({env['device_name']}) threads={env['threads']} "
        f"torch={env['torch']} | image size used: {res['image_size'][0]}x{res['image_size'][1]} "
        f"| batch size {res['batch_size']} | train steps: {res['warmup']} warm-up + {res['iters']} "
        f"timed | inference: {res['warmup']} warm-up + {res['infer_iters']} timed images | data: "
        f"{res['data_source']} | load average at start/end: {env['load_start']}/{env['load_end']}\n"
    )
    cpu = env["device"] == "cpu"
    mem_head = "peak RSS MiB (above start)" if cpu else "peak train mem MiB (max allocated)"
    print(
        "| model | role | params (M) | GFLOPs | train step ms (median) | x base | inference ms/img "
        f"(median) | x base | {mem_head} | x base |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in res["models"]:
        r = m["ratios"]
        mem = m.get("memory") or {}
        if "error" in mem:
            mem_cell = "error"
        elif not mem:
            mem_cell = "skipped"
        elif cpu:
            mem_cell = f"{mem['train_peak_mib']:.0f} ({mem['train_peak_above_start_mib']:.0f})"
        else:
            mem_cell = f"{mem['train_peak_mib']:.0f}"
        flops = m.get("flops") or {}
        gflops = fmt(flops.get("gflops"), ".2f")
        if flops.get("bfp_gflops"):
            gflops += f" (BFP {flops['bfp_gflops']:.3f})"
        print(
            f"| {m['name']} | {m['role']} | {m['params'] / 1e6:.2f} | {gflops} "
            f"| {m['train']['median_ms']:.1f} | {fmt(r['train_step'], '.3f')} "
            f"| {m['inference']['median_ms']:.1f} | {fmt(r['inference'], '.3f')} "
            f"| {mem_cell} | {fmt(r['memory'], '.3f')} |"
        )
    for m in res["models"]:
        if m.get("memory", {}).get("error"):
            print(f"\nmemory of {m['name']}: {m['memory']['error']}")
    if cpu and any(m.get("memory") for m in res["models"]):
        print(
            "\nMemory ratios on the CPU compare the peak RSS (VmHWM) of a fresh child process "
            "above its RSS before the model was built (params + grads + optimizer state + "
            "activations of the training steps); the total peak RSS also holds the Python/torch "
            "runtime. The children run with MALLOC_MMAP_THRESHOLD_="
            f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', MALLOC_MMAP_THRESHOLD)} so that the "
            "RSS follows the live allocations."
        )

    if res["preset"] != "custom" and len(res["models"]) > 2:
        print("\n### Per-component overhead (ratio to the baseline)\n")
        print("| component | config | train step | inference | peak memory | params | GFLOPs |")
        print("|---|---|---|---|---|---|---|")
        base = res["models"][0]
        for m in res["models"][1:]:
            r = m["ratios"]
            f0, f1 = (base.get("flops") or {}).get("gflops"), (m.get("flops") or {}).get("gflops")
            print(
                f"| {m['role']} | {m['name']} | {fmt(r['train_step'], '.3f')}x "
                f"| {fmt(r['inference'], '.3f')}x | {fmt(r['memory'], '.3f')}x "
                f"| {m['params'] / base['params']:.3f}x | {fmt(ratio(f1, f0), '.3f')}x |"
            )

    micro = res.get("micro") or {}
    if micro.get("sampler"):
        s = micro["sampler"]
        print(
            f"\n### Sampler micro-benchmark (512 samples, positive fraction 0.25, 10 GT, "
            f"threads={s['threads']}, median us per image)\n"
        )
        print(
            "| proposals (+GT) | iou_balanced_subsample | subsample_labels | official (numpy/sets) "
            "| ours / subsample_labels | official / ours |"
        )
        print("|---|---|---|---|---|---|")
        for row in s["rows"]:
            u = row["median_us"]
            print(
                f"| {row['num_proposals']} | {u['ours']:.1f} | {u['subsample_labels']:.1f} "
                f"| {u['official']:.1f} | {row['ours_over_subsample_labels']:.2f}x "
                f"| {row['official_over_ours']:.1f}x |"
            )
    if micro.get("bfp"):
        b = micro["bfp"]
        t = b["time"]
        print(
            f"\n### BFP module vs ResNet-{b['depth']} + FPN forward (inference, batch 1, input "
            f"{b['input_size'][0]}x{b['input_size'][1]} padded to "
            f"{b['padded_size'][0]}x{b['padded_size'][1]}, {b['refine_type']} refine at level "
            f"{b['refine_level']})\n"
        )
        print("| module | params (M) | GFLOPs | ms (median) | x FPN forward |")
        print("|---|---|---|---|---|")
        print(
            f"| ResNet-{b['depth']} + FPN ({b['backbone']}) | {b['fpn_backbone_params'] / 1e6:.2f} "
            f"| {fmt(b.get('fpn_backbone_gflops'), '.2f')} | {t['fpn_backbone']['median_ms']:.1f} "
            f"| 1.000 |"
        )
        print(
            f"| BalancedFeaturePyramid on {', '.join(b['levels'])} | {b['bfp_params'] / 1e6:.3f} "
            f"| {fmt(b.get('bfp_gflops'), '.2f')} | {t['bfp']['median_ms']:.1f} "
            f"| {b['bfp_over_fpn_backbone']:.3f} |"
        )

    print("\n### Targets\n")
    print("| target | measured | result |")
    print("|---|---|---|")
    for t in res["targets"]:
        print(f"| {t['target']} | {t['measured']} | {t['result']} |")


def evaluate_targets(res):
    targets = []
    if len(res["models"]) >= 2:
        m = res["models"][1]
        for key, limit, label in MODEL_TARGETS:
            value = m["ratios"][key]
            targets.append(
                dict(
                    target=f"{m['name']} {label} <= {limit:.2f}x baseline",
                    value=value,
                    measured="n/a" if value is None else f"{value:.3f}x",
                    result=met(value, limit),
                )
            )
    sampler = (res.get("micro") or {}).get("sampler")
    for row in sampler["rows"] if sampler else []:
        n = row["num_proposals"]
        v = row["ours_over_subsample_labels"]
        targets.append(
            dict(
                target=f"sampler <= {SAMPLER_MAX_OVER_SUBSAMPLE_LABELS:g}x subsample_labels "
                f"({n} proposals)",
                value=v,
                measured=f"{v:.2f}x",
                result=met(v, SAMPLER_MAX_OVER_SUBSAMPLE_LABELS),
            )
        )
        v = row["official_over_ours"]
        targets.append(
            dict(
                target=f"sampler >= {SAMPLER_MIN_SPEEDUP_OVER_OFFICIAL:g}x faster than official "
                f"({n} proposals)",
                value=v,
                measured=f"{v:.1f}x",
                result=met(v, SAMPLER_MIN_SPEEDUP_OVER_OFFICIAL, le=False),
            )
        )
    return targets


# ---------------------------------------------------------------------------------------------
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args._child is not None:
        print(CHILD_TAG + json.dumps(run_child(json.loads(args._child))), flush=True)
        return 0
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.opts and len(args.opts) % 2:
        parser.error(f"--opts needs KEY VALUE pairs, got {args.opts}")
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sync = synchronizer(args.device)
    load_start = os.getloadavg()[0]

    models, preset = model_list(args)
    try:
        cfgs = {name: make_cfg(path, args.device, args.lr, args.opts) for name, _, path in models}
    except SetupError as e:
        parser.exit(2, f"bench_libra.py: error: {e}\n")
    first = cfgs[models[0][0]]
    image_size = resolve_image_size(first, args.image_size)
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE[preset]
    infer_iters = args.infer_iters or args.iters * batch_size
    print(
        f"bench_libra: {len(models)} models on {args.device}, image size {image_size[0]}x"
        f"{image_size[1]}, batch size {batch_size}",
        flush=True,
    )
    try:
        batches, infer_inputs, source = make_inputs(first, args, image_size, batch_size)
    except SetupError as e:
        parser.exit(2, f"bench_libra.py: error: {e}\n")
    print(f"data: {source}", flush=True)
    res = dict(
        preset=preset,
        args={k: v for k, v in vars(args).items() if k != "_child"},
        image_size=list(image_size),
        batch_size=batch_size,
        iters=args.iters,
        warmup=args.warmup,
        infer_iters=infer_iters,
        data_source=source,
    )

    benches = {}
    for name, _, path in models:
        benches[name] = Bench(cfgs[name], args.seed, batches[0])
        benches[name].model.to(args.device)
    names = [n for n, _, _ in models]

    t0 = time.perf_counter()
    train_times = bench_sampler.time_rounds(
        names,
        lambda name, it: benches[name].train_step(batches[it % len(batches)]),
        args.warmup,
        args.iters,
        sync,
    )
    print(f"training steps timed in {time.perf_counter() - t0:.0f} s", flush=True)
    for b in benches.values():
        b.optimizer.zero_grad()
    t0 = time.perf_counter()
    infer_times = bench_sampler.time_rounds(
        names,
        lambda name, it: benches[name].infer(infer_inputs[it % len(infer_inputs)]),
        args.warmup,
        infer_iters,
        sync,
    )
    print(f"inference timed in {time.perf_counter() - t0:.0f} s", flush=True)

    rows = []
    for name, role, path in models:
        model = benches[name].model
        row = dict(
            name=name,
            role=role,
            config=path,
            params=sum(p.numel() for p in model.parameters()),
            train=summarize(train_times[name]),
            inference=summarize(infer_times[name]),
            train_times_ms=[t * 1e3 for t in train_times[name]],
            inference_times_ms=[t * 1e3 for t in infer_times[name]],
        )
        if not args.skip_flops:
            row["flops"] = model_flops(model, infer_inputs[0])
        rows.append(row)
    benches.clear()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_flops:
        print("FLOPs counted", flush=True)

    if not args.skip_memory:
        with tempfile.TemporaryDirectory(prefix="bench_libra_") as tmp:
            inputs_file = os.path.join(tmp, "inputs.pt")
            torch.save(dict(batches=batches, infer_inputs=infer_inputs), inputs_file)
            for row in rows:
                t0 = time.perf_counter()
                row["memory"] = measure_memory(row["name"], row["config"], inputs_file, args)
                print(
                    f"memory of {row['name']} measured in {time.perf_counter() - t0:.0f} s",
                    flush=True,
                )

    base = rows[0]
    for row in rows:
        row["ratios"] = dict(
            train_step=ratio(row["train"]["median_ms"], base["train"]["median_ms"]),
            inference=ratio(row["inference"]["median_ms"], base["inference"]["median_ms"]),
            memory=ratio(memory_value(row.get("memory")), memory_value(base.get("memory"))),
        )
    res["models"] = rows

    if not args.skip_micro:
        t0 = time.perf_counter()
        res["micro"] = dict(sampler=bench_samplers(args, sync))
        print(f"sampler micro-benchmark in {time.perf_counter() - t0:.0f} s", flush=True)
        t0 = time.perf_counter()
        res["micro"]["bfp"] = bench_bfp(args, sync)
        print(f"BFP micro-benchmark in {time.perf_counter() - t0:.0f} s", flush=True)

    res["targets"] = evaluate_targets(res)
    cuda = args.device == "cuda"
    res["environment"] = dict(
        device=args.device,
        device_name=torch.cuda.get_device_name() if cuda else cpu_name(),
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        load_start=f"{load_start:.2f}",
        load_end=f"{os.getloadavg()[0]:.2f}",
    )
    print_report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
