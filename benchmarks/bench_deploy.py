#!/usr/bin/env python
"""
CPU inference latency of the deployment formats, Libra Faster R-CNN next to detectron2's Faster
R-CNN: eager (``model.inference(..., do_postprocess=False)``), the ``torch.export`` program
(``model.pt2``), the AOTInductor package and onnxruntime (ONNX through the dynamo exporter), on
one image, with the export and compile times.

Default: the COCO R-50-FPN 1x configs at 800x1333; ``--shapes``: the libra_shapes R-18 configs at
224x224. Models are randomly initialised as in ``bench_libra.py`` (whose helpers this uses), with
RPNs that give both models the same proposals (:func:`same_proposals`); every runtime runs with
``torch.set_num_threads(--threads)`` (onnxruntime: ``intra_op_num_threads``).
Per runtime, the two models take turns each round (order rotating); the table gives the median
of ``--iters`` timed rounds after ``--warmup`` and the Libra/baseline ratio (median of per-round
ratios, bootstrap 95% interval).

    python benchmarks/bench_deploy.py --threads 2 --json deploy.json
    python benchmarks/bench_deploy.py --shapes --formats eager export
"""

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_libra import (  # noqa: E402
    CONFIGS,
    ROOT,
    calibrate_frozen_bn,
    make_cfg,
    paired_ratio,
    synthetic_batches,
    time_rounds,
)
from detectron2.modeling import build_model  # noqa: E402

from libra_d2.deploy import (  # noqa: E402
    compile_aoti,
    export_onnx_dynamo,
    export_program,
    output_names,
)

FORMATS = ("eager", "export", "aoti", "onnx")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", action="store_true", help="R-18 shapes configs at 224x224")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--threads", type=int, default=2, help="threads of every runtime")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", help="also write the results here")
    return parser


def same_proposals(model):
    """
    Zero the RPN's objectness and box-delta convolutions: every anchor scores the same with zero
    deltas, so both models keep the same proposals (the same anchors, by the same tie-breaking)
    whatever their features, and the RoI heads' data-dependent work (RoIAlign's adaptive
    sampling) is the same in both (why: docs/BENCHMARKS.md).
    """
    head = model.proposal_generator.rpn_head
    for conv in (head.objectness_logits, head.anchor_deltas):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)


def runtimes(cfg, formats, threads, workdir):
    """{format: callable()} of one model on one synthetic image, and {step: seconds}."""
    args = argparse.Namespace(device="cpu", opts=[], image_size=None, batch_size=1, seed=0)
    (sample,) = synthetic_batches(cfg, args, num_batches=1)[0]
    model = build_model(cfg)
    calibrate_frozen_bn(model, [sample])
    same_proposals(model)
    model.eval()
    image = sample["image"].float()
    fns, seconds = {}, {}
    if "eager" in formats:
        fns["eager"] = lambda: model.inference([{"image": image}], do_postprocess=False)
    if set(formats) - {"eager"}:
        program, seconds["torch.export"] = export_program(model, image, cfg.INPUT.MAX_SIZE_TEST)
    if "export" in formats:
        module = program.module()
        fns["export"] = lambda: module(image)
    if "onnx" in formats:
        import onnxruntime

        path = os.path.join(workdir, "model.onnx")
        seconds["ONNX export (dynamo)"] = export_onnx_dynamo(program, path, output_names(model))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {"image": image.numpy()}
        fns["onnx"] = lambda: session.run(None, feed)
    if "aoti" in formats:  # a fresh program: conversions may modify the one they are given
        program, _ = export_program(model, image, cfg.INPUT.MAX_SIZE_TEST)
        path = os.path.join(workdir, "model_aoti.pt2")
        seconds["AOTInductor compile"] = compile_aoti(program, path)
        package = torch._inductor.aoti_load_package(path)
        fns["aoti"] = lambda: package(image)
    return fns, seconds


def main(argv=None):
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    base, libra = CONFIGS["shapes" if args.shapes else "coco"][:2]
    results = {"threads": args.threads, "torch": torch.__version__, "models": {}}
    fns = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name, config in (("baseline", base), ("libra", libra)):
            cfg = make_cfg(
                str(ROOT / "configs" / config), argparse.Namespace(device="cpu", opts=[])
            )
            workdir = os.path.join(tmp, name)
            os.makedirs(workdir)
            fns[name], seconds = runtimes(cfg, args.formats, args.threads, workdir)
            results["models"][name] = {"config": config, "seconds": seconds}
            print(name, {k: round(v, 1) for k, v in seconds.items()}, flush=True)
        for fmt in args.formats:
            benches = {name: fns[name][fmt] for name in fns}
            times = time_rounds(
                benches, lambda f, it: f(), args.warmup, args.iters, lambda: None, fmt
            )
            results[fmt] = {
                "median_s": {name: float(np.median(t)) for name, t in times.items()},
                "libra_over_baseline": paired_ratio(times["libra"], times["baseline"]),
            }
            r, ratio = results[fmt], results[fmt]["libra_over_baseline"]
            print(
                f"| {fmt} | {r['median_s']['baseline']:.3f} | {r['median_s']['libra']:.3f} | "
                f"{ratio['median']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}] |",
                flush=True,
            )
            if args.json:  # after every runtime, so that a failing one loses nothing
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
