"""Does ``torch.compile`` of the frozen part pay on CPU, compile time included?

The frozen part of the Keras guide's model (RandomFlip + RandomRotation in front of a
frozen EfficientNet-Lite0, ``benchmarks/augment.py``), as frostline's runner splits it,
run on batches of 64 at ``--size`` px without autograd, three ways: the plain frozen
part, frostline's folded channels_last copy (what ``fit`` runs), and ``torch.compile``
of the plain part (inductor). Reports the compile time, the steady time per batch and
the number of batches after which compiling would have paid.

>>> parse_args([]).batches
20
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="timed batches per way")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from torch import nn

    import frostline as fl
    from frostline.engine.runner import Runner

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = fl.models.pretrained("efficientnet_lite0", headless=True)
    aug = [fl.layers.RandomFlip("horizontal"), fl.layers.RandomRotation(0.1)]
    model = fl.Sequential([*aug, base, nn.Linear(base.module.num_features, 10)])
    base.trainable = False
    x = torch.randn(64, 3, args.size, args.size)
    runner = Runner(model.module)
    runner.verify(x)
    runner.run_prefix(x)  # builds and checks the folded copy
    assert runner.prefix is not None
    plain = runner.prefix

    def timed(fn) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.batches):
                fn(x)
        return (time.perf_counter() - t) / args.batches

    t0 = time.perf_counter()
    compiled = torch.compile(plain)
    with torch.no_grad():
        compiled(x)
    compile_s = time.perf_counter() - t0
    rows = {}
    for _ in range(2):  # interleaved, best of two
        for name, fn in (
            ("plain frozen part", plain),
            ("frostline folded copy", lambda v: runner.run_prefix(v)),
            ("torch.compile(plain)", compiled),
        ):
            rows[name] = min(rows.get(name, float("inf")), timed(fn))
    for name, s in rows.items():
        print(f"{name:24s} {s * 1000:8.1f} ms/batch")
    folded, comp = rows["frostline folded copy"], rows["torch.compile(plain)"]
    print(f"compile time {compile_s:.1f} s (first call included)")
    if comp < folded:
        print(f"compiling pays after {compile_s / (folded - comp):.0f} batches of 64")
    else:
        print("compiled is not faster than the folded copy: compiling never pays")
    return 0


if __name__ == "__main__":
    sys.exit(main())
