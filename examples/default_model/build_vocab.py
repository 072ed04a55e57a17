"""Build the default model's vocabulary: the most frequent World tokens of a corpus.

    python examples/default_model/build_vocab.py ../shared/data/corpus/*.jsonl.gz \\
        --size 8192 --out data/default_vocab.txt

The result is a vocabulary file in the World format (``id literal byte_length``) with ids
1..size-1: the 256 single bytes plus the size-257 multi-byte World tokens that occur most
often when the full World tokenizer encodes the corpus. ``WorldTokenizer(path)`` then
encodes with greedy longest match over this subset (id 0 stays end of text).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path

from rwkvkit.tokenizer import DEFAULT_VOCAB_FILE, WorldTokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", type=Path, help=".jsonl or .jsonl.gz files with a 'text' field")
    p.add_argument("--size", type=int, default=8192, help="vocabulary size including id 0 (default 8192)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    world = WorldTokenizer()
    counts: collections.Counter[int] = collections.Counter()
    for path in args.inputs:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            for line in f:
                counts.update(world.encode(json.loads(line)["text"]))

    lines = Path(DEFAULT_VOCAB_FILE).read_text(encoding="utf-8").splitlines()
    by_id = {int(line[: line.index(" ")]): line for line in lines}
    singles = [i for i in by_id if i <= 256]  # ids 1..256 are the single bytes
    multi = [i for i, _ in counts.most_common() if i > 256][: args.size - 1 - len(singles)]
    keep = sorted(singles + multi, key=lambda i: (int(by_id[i].rsplit(" ", 1)[1]), i))  # by byte length
    out = []
    for new_id, old_id in enumerate(keep, start=1):
        line = by_id[old_id]
        out.append(f"{new_id}{line[line.index(' '):]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(out) + "\n", encoding="utf-8")
    covered = sum(c for i, c in counts.items() if i <= 256 or i in set(multi))
    print(f"{len(out) + 1} ids (0 = end of text); the kept tokens cover {covered / sum(counts.values()):.1%} "
          f"of the corpus's World tokens -> {args.out}")


if __name__ == "__main__":
    main()
