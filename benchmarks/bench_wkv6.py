"""The WKV-6 (RWKV-5.2 / RWKV-6) kernel benchmark: the same as `bench_wkv.py --op wkv6` (this
name is kept so that the older command line still works).

    python benchmarks/bench_wkv6.py --out runs/bench_wkv6.json
    python benchmarks/bench_wkv6.py --sweep --out runs/sweep_wkv6.json
"""

import sys

from bench_wkv import main

if __name__ == "__main__":
    sys.exit(main(["--op", "wkv6", *sys.argv[1:]]))
