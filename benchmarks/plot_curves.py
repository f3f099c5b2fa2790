#!/usr/bin/env python
"""
Plot the training losses and the box AP of several detectron2 runs side by side.

Reads ``<run>/metrics.json`` of each run (detectron2's JSON writer: one JSON object per line;
training lines carry ``iteration`` and the losses, evaluation lines ``bbox/AP``, ``bbox/AP50``,
...; a line may carry both) and draws one subplot per loss component (``total_loss``,
``loss_cls``, ``loss_box_reg``, ``loss_rpn_cls``, ``loss_rpn_loc`` and any other ``loss_*``) plus
one for the AP, one line per run. Runs without evaluation lines are simply absent from the AP
subplot. A resumed run that rewrote some iterations keeps the last value of each iteration.

Example::

    python benchmarks/plot_curves.py output/shapes/faster_rcnn_R_18_FPN \\
        output/shapes/libra_faster_rcnn_R_18_FPN --labels "Faster R-CNN" "Libra R-CNN" \\
        --output curves.png
"""

import argparse
import json
import logging
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

logger = logging.getLogger("libra_d2.plot_curves")

LOSS_KEYS = ["total_loss", "loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"]
AP_KEYS = ["bbox/AP", "bbox/AP50", "bbox/AP75"]
AP_STYLES = {"bbox/AP": "-o", "bbox/AP50": "--s", "bbox/AP75": ":^"}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="plot_curves.py",
        description="Plot loss components and box AP of detectron2 runs (metrics.json) side by "
        "side.",
    )
    parser.add_argument(
        "runs", nargs="+", help="output folders holding metrics.json (or metrics.json files)"
    )
    parser.add_argument("--labels", nargs="+", default=None, help="one label per run")
    parser.add_argument("--output", default="curves.png", help="PNG to write (default: curves.png)")
    parser.add_argument(
        "--smooth",
        type=int,
        default=1,
        help="moving-average window over the logged points of the losses (default: 1, none)",
    )
    parser.add_argument(
        "--ap-keys",
        nargs="+",
        default=AP_KEYS,
        help="evaluation metrics to plot (default: bbox/AP bbox/AP50 bbox/AP75)",
    )
    return parser


def metrics_file(run):
    return os.path.join(run, "metrics.json") if os.path.isdir(run) else run


def read_metrics(path):
    """
    Parse a detectron2 metrics.json.

    Returns:
        dict key -> (iterations ndarray, values ndarray), sorted by iteration, the last value kept
        for an iteration that appears more than once; only numeric values of lines with an
        ``iteration``.
    """
    series = {}
    bad = 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(record, dict) or "iteration" not in record:
                continue
            it = record["iteration"]
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    series.setdefault(key, {})[it] = float(value)
    if bad:
        logger.warning(f"{path}: skipped {bad} line(s) that are not JSON")
    out = {}
    for key, points in series.items():
        its = np.array(sorted(points))
        out[key] = (its, np.array([points[i] for i in its]))
    return out


def moving_average(values, window):
    if window <= 1 or len(values) < 2:
        return values
    window = min(window, len(values))
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def plot_runs(runs, labels, output, smooth=1, ap_keys=AP_KEYS):
    """
    Draw the figure.

    Args:
        runs (list[dict]): metrics of each run, as returned by :func:`read_metrics`.
        labels (list[str]): legend label of each run.
        output (str): PNG path.

    Returns:
        dict: label -> {"final": {loss: value}, "ap": {key: last value}} for the summary.
    """
    loss_keys = [k for k in LOSS_KEYS if any(k in r for r in runs)]
    extra = sorted({k for r in runs for k in r if k.startswith("loss_") and k not in LOSS_KEYS})
    loss_keys += extra
    panels = loss_keys + ["AP"]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    summary = {}
    for ax, key in zip(axes.flat, panels):
        if key == "AP":
            any_ap = False
            for i, (run, label) in enumerate(zip(runs, labels)):
                for ap_key in ap_keys:
                    if ap_key in run:
                        its, vals = run[ap_key]
                        ax.plot(
                            its,
                            vals,
                            AP_STYLES.get(ap_key, "-o"),
                            color=colors[i % len(colors)],
                            label=f"{label} {ap_key.split('/')[-1]}",
                            markersize=4,
                        )
                        any_ap = True
            ax.set_title("box AP (evaluation)")
            if any_ap:
                ax.legend(fontsize=7)
            else:
                ax.text(
                    0.5,
                    0.5,
                    "no evaluation results",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                    color="0.4",
                )
        else:
            for i, (run, label) in enumerate(zip(runs, labels)):
                if key in run:
                    its, vals = run[key]
                    ax.plot(
                        its,
                        moving_average(vals, smooth),
                        color=colors[i % len(colors)],
                        label=label,
                        linewidth=1.2,
                    )
            ax.set_title(key)
            ax.legend(fontsize=7)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)

    for run, label in zip(runs, labels):
        summary[label] = dict(
            final={k: float(run[k][1][-1]) for k in loss_keys if k in run},
            last_iteration=int(max((run[k][0][-1] for k in run), default=-1)),
            ap={k: float(run[k][1][-1]) for k in ap_keys if k in run},
        )
    return summary


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels: got {len(args.labels)} labels for {len(args.runs)} runs")
    if args.smooth < 1:
        parser.error(f"--smooth must be >= 1, got {args.smooth}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    runs = []
    for run in args.runs:
        path = metrics_file(run)
        if not os.path.isfile(path):
            parser.exit(2, f"plot_curves.py: error: {path} does not exist\n")
        metrics = read_metrics(path)
        if not metrics:
            parser.exit(2, f"plot_curves.py: error: {path} has no metrics with an iteration\n")
        runs.append(metrics)
    labels = args.labels or [
        os.path.basename(os.path.normpath(r if os.path.isdir(r) else os.path.dirname(r))) or r
        for r in args.runs
    ]
    summary = plot_runs(runs, labels, args.output, args.smooth, args.ap_keys)
    for label, s in summary.items():
        losses = ", ".join(f"{k} {v:.3f}" for k, v in s["final"].items())
        ap = ", ".join(f"{k} {v:.2f}" for k, v in s["ap"].items()) or "no evaluation"
        print(f"{label} (last iteration {s['last_iteration']}): {losses}; {ap}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
