"""`make demo`: the case studies on embedded data.

The case studies (biased digits, multi-task digits) are built under their own issue; until then this
says so and exits successfully.
"""

from __future__ import annotations


def main() -> None:
    print("negtransfer_losses demo: case studies not yet built (feature taps and similarity math are in place).")


if __name__ == "__main__":
    main()
