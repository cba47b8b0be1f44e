"""How long a checkpoint's manifest takes to hash: its shards one after another (quantgate.files.sha256_file in a
loop, as before) against all at once (sha256_files, a thread a core), each way in fresh processes, alternating.

    python docs/bench/hash_shards.py [SHARDS] [MB_EACH] [ROUNDS] > docs/bench/output/hash-shards.jsonl

The shards are random bytes written once to a temporary folder and read once before timing, so both ways read them
from the page cache, as the download step does right after a checkpoint is written (the GPU flow's is written just
before). One JSON line per process, then a summary line: medians, spreads ((max - min) / median), the ratio."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def timed(way: str, folder: str) -> float:
    """One way's seconds, measured in this process."""
    sys.path.insert(0, str(PROJECT))
    from quantgate.files import sha256_file, sha256_files

    paths = sorted(Path(folder).iterdir())
    t0 = time.perf_counter()
    digests = [sha256_file(p) for p in paths] if way == "one-by-one" else sha256_files(paths)
    seconds = time.perf_counter() - t0
    assert len(digests) == len(paths)
    return seconds


def main() -> None:
    given = [int(a) for a in sys.argv[1:4]]
    shards, mb, rounds = given + [4, 512, 5][len(given):]
    with tempfile.TemporaryDirectory() as folder:
        for i in range(shards):
            Path(folder, f"model-{i:05d}.safetensors").write_bytes(os.urandom(mb << 20))
        for p in Path(folder).iterdir():
            p.read_bytes()  # in the page cache before either way is timed
        found = {"one-by-one": [], "at once": []}
        for r in range(rounds):
            for way in found:
                out = subprocess.run([sys.executable, __file__, "--way", way, folder], capture_output=True, text=True,
                                     check=True)
                seconds = float(out.stdout)
                found[way].append(seconds)
                print(json.dumps({"round": r + 1, "way": way, "seconds": round(seconds, 3)}), flush=True)
    summary = {way: {"median_s": round(statistics.median(s), 3),
                     "spread": round((max(s) - min(s)) / statistics.median(s), 4)} for way, s in found.items()}
    summary.update(shards=shards, mb_each=mb, cores=os.cpu_count(), rounds=rounds,
                   speedup=round(summary["one-by-one"]["median_s"] / summary["at once"]["median_s"], 3))
    print(json.dumps(summary))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--way"]:
        print(timed(sys.argv[2], sys.argv[3]))
    else:
        main()
