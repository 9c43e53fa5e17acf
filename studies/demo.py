"""`make demo`: the case studies on data that ships with scikit-learn, tables printed, plots and JSON in results/.

1. Biased digits (studies/biased_digits.py): colour spuriously tied to the digit; anti-transfer and the
   task-irrelevant-label methods against plain training.
2. Multi-task digits (studies/multitask_digits.py): digit and attribute labels on disjoint, scarce samples;
   distribution matching and co-annotation against single-task and plain multi-task models.

    python studies/demo.py [--out results] [--seeds 5] [--quick]

`--quick` trains one seed of each study for one epoch (biased digits) and five steps (multi-task): a smoke run of
seconds that checks the pipeline, not the numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import biased_digits
import multitask_digits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results")
    parser.add_argument("--seeds", default="5")
    parser.add_argument("--quick", action="store_true", help="one seed, one epoch / five steps: a smoke run")
    args = parser.parse_args(argv)
    seeds = "1" if args.quick else args.seeds
    biased_length = ["--epochs", "1"] if args.quick else []
    multitask_length = ["--steps", "5"] if args.quick else []
    start = time.perf_counter()
    print("== Case study 1: biased digits ==")
    biased_digits.main(["--out", args.out, "--seeds", seeds, *biased_length])
    print("\n== Case study 2: multi-task digits ==")
    multitask_digits.main(["--out", args.out, "--seeds", seeds, *multitask_length])
    print(f"\nmake demo finished in {time.perf_counter() - start:.0f} s; see {args.out}/ and docs/case-studies.md")


if __name__ == "__main__":
    main()
