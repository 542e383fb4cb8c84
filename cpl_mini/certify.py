r"""Certified l2 robustness from the logit margin of a Lipschitz network.

If every logit difference ``f_y - f_j`` is ``K_{yj}``-Lipschitz (l2) and ``f`` is L-Lipschitz, the
prediction ``y`` cannot change within the l2 radius

.. math::  r(x) = \frac{f_y(x) - \max_{j \ne y} f_j(x)}{\sqrt{2}\, L}

(Tsuzuku et al., 2018): ``f_y - f_j = <e_y - e_j, f>`` is ``sqrt(2) L``-Lipschitz. With a row-normalised
head the tighter pairwise radius is ``min_{j != y} (f_y - f_j) / (L_body * ||v_y - v_j||)``.
Certificates here use the *sound* evaluation-mode norms (guaranteed upper bounds) and float32 or
better, so every radius is a proven lower bound of the distance to the nearest adversarial example.
"""
import argparse
import json
import math
import pathlib
import sys
import time

import torch
import torch.nn as nn

from .layers import RowNormalizedLinear, lipschitz_upper_bound

__all__ = ["DEFAULT_EPS", "certified_radius", "certified_radius_pairwise", "certified_accuracy",
           "network_lipschitz", "main"]

#: The radii reported in the literature on CIFAR-10: 36/255, 72/255, 108/255.
DEFAULT_EPS = (36 / 255, 72 / 255, 108 / 255)


def _margin(logits, labels):
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, labels[:, None], float("-inf"))
    return true - other.max(dim=1).values


def certified_radius(logits, labels, lipschitz=1.0):
    """Per-example certified l2 radius ``(f_y - max_{j!=y} f_j) / (sqrt(2) L)``, shape ``(N,)``.

    ``logits``: ``(N, K)``; ``labels``: ``(N,)``. A radius ``<= 0`` means the example is misclassified
    (or tied) and certifies nothing.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return _margin(logits.float(), labels) / (math.sqrt(2.0) * lipschitz)


def certified_radius_pairwise(logits, labels, pairwise_lipschitz, lipschitz=1.0):
    """Per-example radius ``min_{j != y} (f_y - f_j) / (L * K_{yj})`` for a head with pairwise constants.

    ``pairwise_lipschitz``: ``(K, K)`` matrix with ``K_{yj}`` the Lipschitz constant of ``f_y - f_j``
    with respect to the head's input (e.g. :meth:`RowNormalizedLinear.pairwise_lipschitz`).
    """
    logits = logits.double()
    k = pairwise_lipschitz.to(logits.device, torch.float64)
    diff = logits.gather(1, labels[:, None]) - logits  # (N, K): f_y - f_j
    scale = k[labels] * lipschitz  # (N, K)
    ratio = diff / scale.clamp_min(1e-300)
    ratio.scatter_(1, labels[:, None], float("inf"))
    return ratio.min(dim=1).values.float()


def network_lipschitz(model, input_lipschitz=1.0):
    """``(L, pairwise)``: a guaranteed bound of the network's l2 Lipschitz constant and, for a
    row-normalised head, the pairwise matrix of its logit differences (else ``None``).

    ``input_lipschitz`` is the constant of the input normalisation (1/min(std) when dividing by std).
    """
    if isinstance(model, nn.Sequential) and isinstance(model[-1], RowNormalizedLinear):
        body = lipschitz_upper_bound(model[:-1]) * input_lipschitz
        return body, model[-1].pairwise_lipschitz()
    return lipschitz_upper_bound(model) * input_lipschitz, None


def _batches(data, batch_size, device):
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        x_all, y_all = data
        for i in range(0, len(x_all), batch_size):
            yield x_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device)
    else:
        for x, y in data:
            yield x.to(device), y.to(device)


@torch.no_grad()
def certified_accuracy(model, data, eps=DEFAULT_EPS, input_lipschitz=None, batch_size=500, device=None):
    """Clean accuracy, certified accuracy at each ``eps`` and all radii, with sound bounds.

    Args:
        model: a network in the package's pieces (``lipschitz_upper_bound`` must know it).
        data: an iterable of ``(x, y)`` batches (e.g. :class:`cpl_mini.data.DeviceLoader`) or a
            pair of tensors ``(inputs, labels)``; inputs already normalised as the model expects.
        eps: l2 radii in the input's pixel scale ([0, 1] images).
        input_lipschitz: Lipschitz constant of the normalisation from pixels to the model's input;
            default: ``data.lipschitz_factor`` when the loader has it, else 1.
    Returns:
        dict with ``accuracy``, ``certified`` (``{eps: fraction}``), ``radii`` (``(N,)`` tensor, cpu;
        ``<= 0`` for misclassified examples), ``lipschitz`` (the bound used), ``n``.
    The forward pass runs in evaluation mode, float32 (never autocast).
    """
    if input_lipschitz is None:
        input_lipschitz = float(getattr(data, "lipschitz_factor", 1.0))
    was_training = model.training
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    lip, pairwise = network_lipschitz(model, input_lipschitz)
    radii = []
    try:
        with torch.autocast(device.type, enabled=False):
            for x, y in _batches(data, batch_size, device):
                logits = model(x.float()).float()
                if pairwise is None:
                    r = certified_radius(logits, y, lip)
                else:
                    r = certified_radius_pairwise(logits, y, pairwise, lip)
                radii.append(r.cpu())
    finally:
        model.train(was_training)
    radii = torch.cat(radii) if radii else torch.zeros(0)
    n = radii.numel()
    correct = radii > 0
    return {
        "accuracy": correct.float().mean().item() if n else float("nan"),
        "certified": {float(e): (radii > e).float().mean().item() if n else float("nan") for e in eps},
        "radii": radii,
        "lipschitz": lip,
        "n": n,
    }


def format_table(result):
    """A small text table of a :func:`certified_accuracy` result."""
    lines = [f"{'eps':>10} | {'certified accuracy':>18}", "-" * 32, f"{'clean':>10} | {100 * result['accuracy']:17.2f}%"]
    for e, acc in result["certified"].items():
        lines.append(f"{round(e * 255):>6}/255 | {100 * acc:17.2f}%")
    return "\n".join(lines)


def main(argv=None):
    """``python -m cpl_mini.certify RUN_DIR``: certify the test set with a run's checkpoint."""
    from .train import load_run_model  # late import: train imports this module

    parser = argparse.ArgumentParser(prog="python -m cpl_mini.certify",
                                     description="Certified l2 accuracy of a trained run (sound bounds).")
    parser.add_argument("run_dir", type=pathlib.Path, help="a folder written by python -m cpl_mini.train")
    parser.add_argument("--data-root", default=None, help="CIFAR folder (default: $CPL_MINI_DATA or the cache)")
    parser.add_argument("--limit-test", type=int, default=None, help="certify only the first N test images")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    start = time.time()
    model, test_loader, cfg = load_run_model(args.run_dir, data_root=args.data_root, device=args.device,
                                             limit_test=args.limit_test)
    result = certified_accuracy(model, test_loader)
    seconds = time.time() - start
    if args.json:
        print(json.dumps({"accuracy": result["accuracy"],
                          "certified": {f"{round(e * 255)}/255": v for e, v in result["certified"].items()},
                          "n": result["n"], "lipschitz": result["lipschitz"], "seconds": seconds}))
    else:
        print(f"run {args.run_dir} | network {cfg['size']} | {result['n']} test images | "
              f"Lipschitz bound {result['lipschitz']:.6f} | {seconds:.1f} s")
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
