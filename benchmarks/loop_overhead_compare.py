"""The decoding loop's own cost per step (part (c) of decode_speed.py) for one source tree, to compare
two versions of lmlab in the same session (run it once per tree, interleaved):

    PYTHONPATH=OLD/src python benchmarks/loop_overhead_compare.py OLD/benchmarks
    PYTHONPATH=src python benchmarks/loop_overhead_compare.py benchmarks

Prints one JSON line: microseconds of loop per step for each case of ``loop_overhead``
(batch 1 and 32, 8-token prompts, 56 new tokens), one torch thread, process CPU time.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: loop_overhead_compare.py BENCHMARKS_DIR (the folder holding that tree's decode_speed.py)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    sys.path.insert(0, argv[0])
    import decode_speed

    decode_speed.CLOCK = time.process_time
    rows = [r for batch in (1, 32) for r in decode_speed.loop_overhead(batch, 8, 56, 5)]
    print(json.dumps({f"{r['case']} b={r['batch']}": round(r["loop_us_per_step"]) for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
