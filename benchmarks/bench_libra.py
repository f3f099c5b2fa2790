#!/usr/bin/env python
"""
What Libra R-CNN costs over Faster R-CNN: training step, inference, peak training memory,
parameters and FLOPs, measured side by side in one run.

Default: the COCO R-50-FPN 1x configs at 800x1333; ``--shapes``: the libra_shapes R-18 configs at
224x224 (a quick run). Every model is built with random initialisation (``MODEL.WEIGHTS ""``,
nothing is downloaded; the frozen BN statistics are set from the first batch so that activations
stay finite) and trained by detectron2's ``SimpleTrainer`` with a tiny learning rate on the same
synthetic batches (noise images with 3-8 filled random boxes); the cost of a step does not depend
on the weights' values.

* Training step and inference (one image, ``torch.no_grad``): the models take turns within every
  round, in an order that rotates each round, so that load changes hit them alike. A model's
  ratio to the baseline is the median over rounds of the per-round ratio, with a bootstrap 95%
  interval of that median.
* Peak training memory: a fresh child process per model running ``--memory-steps`` steps; CUDA
  max allocated, or on the CPU the peak RSS (VmHWM) above the RSS before the model is built, with
  glibc's mmap threshold fixed so that the RSS follows the live tensors.
* FLOPs: detectron2's ``FlopCountAnalysis`` of one inference image (one multiply-add counts as
  one flop; the non-local attention is counted).

Examples::

    python benchmarks/bench_libra.py                       # COCO R-50, 800x1333, batch 2, CPU
    python benchmarks/bench_libra.py --batch-size 1 --json coco_b1.json
    python benchmarks/bench_libra.py --device cuda         # the COCO batch per GPU (2)
    python benchmarks/bench_libra.py --shapes              # R-18 at 224, a few minutes
    python benchmarks/bench_libra.py --ablations           # + sampler / BFP / balanced L1 alone
"""

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.engine import SimpleTrainer
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import Boxes, Instances
from detectron2.utils.analysis import FlopCountAnalysis
from detectron2.utils.events import EventStorage
from fvcore.nn.jit_handles import get_shape

from libra_d2 import add_libra_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # baseline, Libra, then the single-component ablations
    "coco": [
        "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
        "COCO-Detection/libra_faster_rcnn_R_50_FPN_1x.yaml",
        "COCO-Detection/libra_faster_rcnn_R_50_FPN_1x_sampling_only.yaml",
        "COCO-Detection/libra_faster_rcnn_R_50_FPN_1x_bfp_only.yaml",
        "COCO-Detection/libra_faster_rcnn_R_50_FPN_1x_balanced_l1_only.yaml",
    ],
    "shapes": [
        "libra_shapes/faster_rcnn_R_18_FPN.yaml",
        "libra_shapes/libra_faster_rcnn_R_18_FPN.yaml",
        "libra_shapes/libra_faster_rcnn_R_18_FPN_sampling_only.yaml",
        "libra_shapes/libra_faster_rcnn_R_18_FPN_bfp_only.yaml",
        "libra_shapes/libra_faster_rcnn_R_18_FPN_balanced_l1_only.yaml",
    ],
}
MEMORY_TAG = "BENCH_LIBRA_MEMORY "
MALLOC_MMAP_THRESHOLD = "65536"  # bytes: larger blocks are mmapped, and unmapped when freed


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def image_size(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 800x1333), got {text!r}")
    if min(h, w) < 32:
        raise argparse.ArgumentTypeError(f"image sides must be >= 32, got {text!r}")
    return h, w


def build_parser():
    parser = argparse.ArgumentParser(
        description="Training step, inference, peak memory, params and FLOPs of Libra R-CNN "
        "vs Faster R-CNN.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--shapes", action="store_true", help="libra_shapes R-18 configs at 224")
    which.add_argument("--configs", nargs="+", metavar="YAML", help="the first is the baseline")
    parser.add_argument("--ablations", action="store_true", help="add the *_only configs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--image-size", type=image_size, help="default: the config's test size")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="images per step")
    parser.add_argument("--iters", type=positive_int, default=8, help="timed training rounds")
    parser.add_argument("--infer-iters", type=positive_int, default=8, help="timed images")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--memory-steps", type=positive_int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-flops", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0: default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...) for every model"
    )
    return parser


def make_cfg(config_file, args):
    cfg = get_cfg()
    add_libra_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(["MODEL.DEVICE", args.device, "MODEL.WEIGHTS", "", "SOLVER.BASE_LR", 1e-5])
    cfg.merge_from_list(args.opts)
    return cfg


def synthetic_batches(cfg, args, num_batches=2):
    """``num_batches`` lists of ``batch_size`` dicts (uint8 image, height, width, instances)."""
    h, w = args.image_size or (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    gen = torch.Generator().manual_seed(args.seed)
    samples = []
    for _ in range(num_batches * args.batch_size):
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
        n = int(torch.randint(3, 9, (1,), generator=gen))
        wh = (torch.rand(n, 2, generator=gen) * 0.45 + 0.05) * torch.tensor([w, h])
        xy = torch.rand(n, 2, generator=gen) * (torch.tensor([w, h]) - wh)
        boxes = torch.cat([xy, xy + wh], dim=1)
        for x0, y0, x1, y1 in boxes.round().int().tolist():
            image[:, y0:y1, x0:x1] = torch.randint(0, 256, (3, 1, 1), generator=gen)
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(cfg.MODEL.ROI_HEADS.NUM_CLASSES, (n,), generator=gen)
        samples.append({"image": image, "height": h, "width": w, "instances": inst})
    return [samples[i::num_batches] for i in range(num_batches)]


@torch.no_grad()
def calibrate_frozen_bn(model, batch):
    """Set every FrozenBatchNorm2d's statistics to those of its input on ``batch``."""

    def hook(module, inputs):
        module.running_mean.copy_(inputs[0].mean(dim=(0, 2, 3)))
        module.running_var.copy_(inputs[0].var(dim=(0, 2, 3)))

    bns = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    handles = [m.register_forward_pre_hook(hook) for m in bns]
    model.backbone(model.preprocess_image(batch).tensor)
    for h in handles:
        h.remove()


class Bench:
    """A model and detectron2's ``SimpleTrainer`` over the shared batches."""

    def __init__(self, cfg, batches, seed):
        torch.manual_seed(seed)
        self.model = build_model(cfg)
        calibrate_frozen_bn(self.model, batches[0])
        self.trainer = SimpleTrainer(
            self.model, itertools.cycle(batches), build_optimizer(cfg, self.model)
        )
        self.trainer.storage = EventStorage()

    def train_step(self):
        self.model.train()
        with self.trainer.storage:
            self.trainer.run_step()
        self.trainer.iter += 1

    @torch.no_grad()
    def infer(self, sample):
        self.model.eval()
        return self.model([{k: sample[k] for k in ("image", "height", "width")}])


def time_rounds(benches, fn, warmup, iters, sync, label):
    """{name: [seconds per timed round]}; the names take turns, the order rotating each round."""
    names = list(benches)
    times = {n: [] for n in names}
    for it in range(warmup + iters):
        print(f"{label}: round {it + 1}/{warmup + iters}", flush=True)
        for name in names[it % len(names) :] + names[: it % len(names)]:
            sync()
            t0 = time.perf_counter()
            fn(benches[name], it)
            sync()
            if it >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(times, base_times, seed=0, resamples=2000):
    """Median of the per-round ratios and a bootstrap 95% interval of that median."""
    r = np.asarray(times) / np.asarray(base_times)
    boot = np.median(np.random.default_rng(seed).choice(r, (resamples, len(r))), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return dict(median=float(np.median(r)), low=float(lo), high=float(hi))


def sdpa_flop_jit(inputs, outputs):
    """aten::scaled_dot_product_attention: B * L * S * (E + Ev) multiply-adds."""
    q, v = get_shape(inputs[0]), get_shape(inputs[2])
    return int(np.prod(q[:-2])) * q[-2] * v[-2] * (q[-1] + v[-1])


def count_flops(model, sample):
    """GFLOPs of one inference image, in total and in the BFP."""
    model.eval()
    inputs = [{k: sample[k] for k in ("image", "height", "width")}]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings
        flops = FlopCountAnalysis(model, inputs)
        flops.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_module = flops.by_module()
    return dict(gflops=flops.total() / 1e9, bfp_gflops=by_module.get("model.backbone.bfp", 0) / 1e9)


def rss_mib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def memory_child(config_file, args):
    """Peak training memory (MiB) of a model built in this (fresh) process."""
    cfg = make_cfg(config_file, args)
    batches = synthetic_batches(cfg, args)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        start = rss_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM
    bench = Bench(cfg, batches, args.seed)
    for _ in range(args.memory_steps):
        bench.train_step()
    if args.device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return rss_mib("VmHWM") - start


def measure_memory(config_file, argv):
    cmd = [sys.executable, __file__, "--memory-child", config_file] + argv
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MALLOC_MMAP_THRESHOLD)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(MEMORY_TAG):
            return float(line[len(MEMORY_TAG) :])
    raise RuntimeError(f"memory child for {config_file} failed:\n{proc.stderr[-2000:]}")


def cpu_name():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "cpu")


def run(args, argv):
    if args.configs:
        configs = args.configs
    else:
        preset = CONFIGS["shapes" if args.shapes else "coco"]
        configs = [str(ROOT / "configs" / c) for c in preset[: None if args.ablations else 2]]
    names = [Path(c).stem for c in configs]
    cfgs = {n: make_cfg(c, args) for n, c in zip(names, configs)}
    batches = synthetic_batches(cfgs[names[0]], args)
    samples = [s for b in batches for s in b]
    sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None
    h, w = samples[0]["image"].shape[-2:]
    print(f"{len(names)} models, {h}x{w}, batch {args.batch_size}, {args.device}", flush=True)

    benches = {n: Bench(cfgs[n], batches, args.seed) for n in names}
    t0 = time.perf_counter()
    train = time_rounds(
        benches, lambda b, it: b.train_step(), args.warmup, args.iters, sync, "training"
    )
    t1 = time.perf_counter()
    infer = time_rounds(
        benches,
        lambda b, it: b.infer(samples[it % len(samples)]),
        args.warmup,
        args.infer_iters,
        sync,
        "inference",
    )
    print(f"timed in {t1 - t0:.0f} s (train) + {time.perf_counter() - t1:.0f} s (inference)")
    rows = []
    for name, config in zip(names, configs):
        model = benches[name].model
        rows.append(
            dict(
                name=name,
                config=config,
                params=sum(p.numel() for p in model.parameters()),
                train_ms=[t * 1e3 for t in train[name]],
                inference_ms=[t * 1e3 for t in infer[name]],
                train_ratio=paired_ratio(train[name], train[names[0]]),
                inference_ratio=paired_ratio(infer[name], infer[names[0]]),
            )
        )
        if not args.skip_flops:
            rows[-1].update(count_flops(model, samples[0]))
    benches.clear()
    if not args.skip_memory:
        for row in rows:
            row["train_memory_mib"] = measure_memory(row["config"], argv)
            row["memory_ratio"] = row["train_memory_mib"] / rows[0]["train_memory_mib"]
    return dict(
        image_size=[h, w],
        batch_size=args.batch_size,
        device=torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        models=rows,
    )


def report(res, args):
    def ratio(r):
        return f"{r['median']:.3f} ({r['low']:.3f}-{r['high']:.3f})"

    print(
        f"\n{res['device']}, {res['threads']} threads, torch {res['torch']}; input "
        f"{res['image_size'][0]}x{res['image_size'][1]}, training batch {res['batch_size']}; "
        f"medians over {args.iters} training rounds and {args.infer_iters} images, x baseline "
        "(bootstrap 95% interval)\n"
    )
    print(
        "| model | params (M) | GFLOPs (BFP) | train step ms | x baseline | inference ms | "
        "x baseline | peak train memory MiB | x baseline |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for m in res["models"]:
        flops = f"{m['gflops']:.1f} ({m['bfp_gflops']:.1f})" if "gflops" in m else "-"
        memory = (
            f"{m['train_memory_mib']:.0f} | {m['memory_ratio']:.3f}"
            if "train_memory_mib" in m
            else "- | -"
        )
        print(
            f"| {m['name']} | {m['params'] / 1e6:.2f} | {flops} "
            f"| {np.median(m['train_ms']):.0f} | {ratio(m['train_ratio'])} "
            f"| {np.median(m['inference_ms']):.0f} | {ratio(m['inference_ratio'])} | {memory} |"
        )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if len(args.opts) % 2:
        parser.error(f"config overrides need KEY VALUE pairs, got {args.opts}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    for config in args.configs or []:
        if not os.path.isfile(config):
            parser.error(f"config file {config!r} does not exist")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(MEMORY_TAG + str(memory_child(args.memory_child, args)), flush=True)
        return 0
    res = run(args, argv)
    report(res, args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
