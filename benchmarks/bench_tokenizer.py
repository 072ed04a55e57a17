"""Encode/decode speed of rwkvkit's WorldTokenizer against the reference tokenizer of the
``rwkv`` package (``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``, pure Python), on the same texts.

Run from the repository root::

    python benchmarks/bench_tokenizer.py [--repeat 7] [--max-mb 0.5]

Corpora: English prose (TinyStories sample from ``shared/data/corpus`` when present, else
English-like text built from vocabulary words), Chinese and Japanese prose (sentences
below, shuffled), Python code (standard library sources) and all of them mixed. For each,
the ids of both tokenizers are checked to be identical, then each timing is the median of
``--repeat`` runs (interleaved, garbage collector off as in ``timeit``). Times are CPU
time of this process (``time.process_time``), so other load on the machine disturbs them
less than wall-clock time.

"cold" runs start with an empty piece cache (the first document a tokenizer sees); "warm"
runs reuse the cache the previous run filled (the same text again). A second table encodes
each corpus as 5 KB documents after a warm-up on other documents of it (tokenizing a data
set), a third the time of one call on short texts (prompts).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import importlib
import inspect
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
try:
    import rwkvkit  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

from rwkvkit.tokenizer import DEFAULT_VOCAB_FILE, WorldTokenizer  # noqa: E402

TINYSTORIES = "data/corpus/tinystories_valid_sample.jsonl.gz"

CHINESE = """人工智能正在改变我们的生活方式。从早上醒来到晚上入睡，我们身边的许多设备都在悄悄地学习和适应我们的习惯。
语言模型是一种能够理解和生成自然语言的计算机程序。它通过阅读大量的文本来学习词语之间的关系。
循环神经网络的优点是推理时只需要保存一个固定大小的状态，因此生成很长的文本时内存占用不会增加。
今天天气很好，我们一起去公园散步吧。湖边的柳树已经发芽了，孩子们在草地上放风筝。
这本书讲述了一个年轻人离开家乡、在大城市里努力工作并最终实现梦想的故事。
为了提高训练效率，研究人员设计了新的并行算法，使模型可以在数千张显卡上同时训练。
中国的历史悠久，文化灿烂。长城、故宫和兵马俑都是举世闻名的古迹，每年吸引着数以百万计的游客。
他说：“我们明天早上八点在火车站见面，别忘了带上身份证和车票。”
数据清洗是机器学习中非常重要的一步，错误的数据会导致模型学到错误的规律。
春节是中国最重要的传统节日，人们会回家和家人团聚，吃饺子，放鞭炮，互相拜年。
小明的妈妈在医院工作，她每天早出晚归，非常辛苦，但是她从来没有抱怨过。
如果你想学好一门外语，最重要的是每天坚持练习，多听、多说、多读、多写。"""

JAPANESE = """吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。
東京の桜は三月の終わりごろに咲き始め、四月の初めには満開になります。
このプログラムは、入力された文章を単語に分割し、それぞれの出現回数を数えます。
明日は雨が降るかもしれないので、傘を持って行ったほうがいいですよ。
彼女は毎朝六時に起きて、近くの公園を三十分ほど散歩するのが日課です。
新しい研究によると、十分な睡眠は記憶の定着に大きな役割を果たしているそうです。"""


def find_shared(relative: str) -> Path | None:
    """``shared/<relative>`` inside the repository or beside it, if present."""
    for base in (ROOT / "shared", ROOT.parent / "shared"):
        if (base / relative).is_file():
            return base / relative
    return None


def shuffled_prose(source: str, size: int, rng: random.Random) -> str:
    """About ``size`` UTF-8 bytes of the sentences of ``source`` in random order."""
    sentences = [s for s in source.replace("。", "。\n").split("\n") if s]
    parts: list[str] = []
    total = 0
    while total < size:
        sentence = rng.choice(sentences) + ("\n" if rng.random() < 0.2 else "")
        parts.append(sentence)
        total += len(sentence.encode())
    return "".join(parts)


def english(size: int, rng: random.Random, tok: WorldTokenizer) -> tuple[str, str]:
    """English prose: the TinyStories sample if available, else sentences of vocabulary words."""
    path = find_shared(TINYSTORIES)
    if path is not None:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            text = "\n".join(json.loads(line)["text"] for line in f)
        return "english (TinyStories)", text.encode()[:size].decode("utf-8", "ignore")
    words = []
    for i in range(257, 65530):
        piece = tok.decode_bytes([i])
        if piece[:1] == b" " and piece[1:].isalpha() and piece[1:].islower() and len(piece) > 3:
            words.append(piece.decode())
    parts: list[str] = []
    total = 0
    while total < size:
        sentence = "".join(rng.choices(words, k=rng.randint(4, 16))).strip().capitalize()
        parts.append(sentence + rng.choice([". ", ", ", "! ", ".\n\n"]))
        total += len(parts[-1])
    return "english (vocabulary words)", "".join(parts)[:size]


def python_code(size: int) -> str:
    """Python standard-library sources."""
    modules = ("argparse", "collections", "inspect", "json.decoder", "random", "typing", "pathlib")
    source = "".join(inspect.getsource(importlib.import_module(m)) for m in modules)
    return source.encode()[:size].decode("utf-8", "ignore")


def build_corpora(max_bytes: int, tok: WorldTokenizer) -> dict[str, str]:
    rng = random.Random(0)
    name, text = english(max_bytes, rng, tok)
    corpora = {
        name: text,
        "chinese": shuffled_prose(CHINESE, max_bytes // 2, rng),
        "japanese": shuffled_prose(JAPANESE, max_bytes // 2, rng),
        "python code": python_code(max_bytes),
    }
    chunks = [t[i : i + 2000] for t in corpora.values() for i in range(0, len(t), 2000)]
    rng.shuffle(chunks)
    corpora["mixed"] = "".join(chunks)
    return corpora


def timed(fn: Callable[[], object]) -> float:
    """CPU seconds one call of ``fn`` takes, with the garbage collector off (as ``timeit`` does)."""
    gc.disable()
    try:
        start = time.process_time()
        fn()
        return time.process_time() - start
    finally:
        gc.enable()


def throughput_table(ours: WorldTokenizer, ref: Any, corpora: dict[str, str], repeat: int) -> None:
    header = (
        f"{'corpus':<27}{'MB':>6}{'tokens':>9} | {'encode MB/s: ref':>16}{'cold':>7}{'warm':>7}"
        f"{'cold/ref':>10}{'warm/ref':>10} | {'decode MB/s: ref':>16}{'ours':>7}{'ours/ref':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, text in corpora.items():
        size = len(text.encode()) / 1e6
        expected = ref.encode(text)
        ours._pieces.clear()  # cold: an empty piece cache, as in a new tokenizer
        if ours.encode(text) != expected or ours.encode(text) != expected:  # cold, then warm
            sys.exit(f"{name}: ids differ from the reference")
        if not ours.decode(expected) == ref.decode(expected) == text:
            sys.exit(f"{name}: decoding differs")
        runs: dict[str, list[float]] = {"ref": [], "cold": [], "warm": [], "dec_ref": [], "dec": []}
        for _ in range(repeat):
            gc.collect()
            runs["ref"].append(timed(lambda: ref.encode(text)))
            ours._pieces.clear()
            runs["cold"].append(timed(lambda: ours.encode(text)))
            runs["warm"].append(timed(lambda: ours.encode(text)))
            runs["dec_ref"].append(timed(lambda: ref.decode(expected)))
            runs["dec"].append(timed(lambda: ours.decode(expected)))
        t = {k: statistics.median(v) for k, v in runs.items()}
        mb_s = {k: size / v for k, v in t.items()}
        print(
            f"{name:<27}{size:>6.2f}{len(expected):>9} | {mb_s['ref']:>16.2f}{mb_s['cold']:>7.1f}"
            f"{mb_s['warm']:>7.1f}{t['ref'] / t['cold']:>9.1f}x{t['ref'] / t['warm']:>9.1f}x | "
            f"{mb_s['dec_ref']:>16.1f}{mb_s['dec']:>7.1f}{t['dec_ref'] / t['dec']:>9.1f}x"
        )


def documents_table(ours: WorldTokenizer, ref: Any, corpora: dict[str, str], repeat: int) -> None:
    """Tokenizing a data set: 5 KB documents, the cache first filled by other documents."""
    print(f"\n{'5 KB documents (2nd half)':<27}{'ref MB/s':>10}{'ours MB/s':>10}{'ours/ref':>10}")
    for name, text in corpora.items():
        half = len(text) // 2
        docs = [text[i : i + 5000] for i in range(half, len(text), 5000)]
        runs: dict[str, list[float]] = {"ref": [], "ours": []}
        for _ in range(min(repeat, 3)):
            ours._pieces.clear()
            for i in range(0, half, 5000):  # warm-up on the first half
                ours.encode(text[i : i + 5000])
            runs["ours"].append(timed(lambda: [ours.encode(d) for d in docs]))
            runs["ref"].append(timed(lambda: [ref.encode(d) for d in docs]))
        t = {k: statistics.median(v) for k, v in runs.items()}
        size = sum(len(d.encode()) for d in docs) / 1e6
        ratio = t["ref"] / t["ours"]
        print(f"{name:<27}{size / t['ref']:>10.2f}{size / t['ours']:>10.1f}{ratio:>9.1f}x")


def latency_table(ours: WorldTokenizer, ref: Any, text: str, repeat: int) -> None:
    """Per-call time on short inputs (prompts), cold piece cache."""
    print(f"\n{'encode one text':<27}{'ref us':>10}{'ours us':>10}{'ref/ours':>10}")
    for size in (64, 256, 1000, 10000):
        snippet = text.encode()[:size].decode("utf-8", "ignore")
        ref_runs, our_runs = [], []
        for _ in range(repeat * 20):
            ref_runs.append(timed(lambda: ref.encode(snippet)))
            ours._pieces.clear()
            our_runs.append(timed(lambda: ours.encode(snippet)))
        r, o = statistics.median(ref_runs) * 1e6, statistics.median(our_runs) * 1e6
        print(f"{f'{size} bytes of mixed text':<27}{r:>10.1f}{o:>10.1f}{r / o:>9.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs per timing (median)")
    parser.add_argument("--max-mb", type=float, default=0.5, help="size of each corpus")
    args = parser.parse_args()
    try:
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
    except ImportError:
        sys.exit("the reference tokenizer needs the rwkv package: pip install rwkv==0.8.32")

    load_ours = timed(WorldTokenizer)
    load_ref = timed(lambda: TRIE_TOKENIZER(str(DEFAULT_VOCAB_FILE)))
    ours, ref = WorldTokenizer(), TRIE_TOKENIZER(str(DEFAULT_VOCAB_FILE))
    print(f"vocabulary load: rwkvkit {load_ours:.2f} s, reference {load_ref:.2f} s\n")
    corpora = build_corpora(int(args.max_mb * 1e6), ours)
    throughput_table(ours, ref, corpora, args.repeat)
    documents_table(ours, ref, corpora, args.repeat)
    latency_table(ours, ref, corpora["mixed"], args.repeat)


if __name__ == "__main__":
    main()
