"""Offline (cached targets) vs online (teacher in the loop) training throughput.

    python benchmarks/train.py                      # CPU defaults: fd-tiny <- ViT-B-16 @ 64 px
    python benchmarks/train.py --student beit_base_patch16_224 --teacher ViT-L-14 \\
        --resolution 224 --batch-size 256            # GPU

A thin front to ``fdcache.tools.bench.run_bench`` (the same measurement as ``fdcache bench``),
restricted to the training modes.
"""

import argparse
import json

from fdcache.tools.bench import BenchConfig, run_bench


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="fd-tiny")
    ap.add_argument("--teacher", default="ViT-B-16")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    r = run_bench(BenchConfig(student=args.student, teacher=args.teacher, random_init=True,
                              resolution=args.resolution, batch_size=args.batch_size, steps=args.steps,
                              warmup=1, repeats=args.repeats, modes=("ceiling", "offline", "online")))
    print(json.dumps(r, indent=2))
    print(f"\n| device | student <- teacher | batch | ceiling img/s | offline img/s | online img/s | "
          f"offline/online | FLOP-ratio limit | offline/ceiling |\n|---|---|---|---|---|---|---|---|---|")
    e, q = r["environment"], r["ratios"]
    print(f"| {e['device']} | {e['student']} <- {e['teacher']} | {e['batch_size']} | "
          f"{r['ceiling']['images_per_s']:.1f} | {r['offline']['images_per_s']:.1f} | "
          f"{r['online']['images_per_s']:.1f} | {q['offline_over_online']:.2f} | {q['flop_ratio_limit']:.2f} | "
          f"{q['offline_over_ceiling']:.2f} |")


if __name__ == "__main__":
    main()
