"""Issue 2 memory benchmark: read every tensor of a >= 2 GB sharded checkpoint; peak RSS vs largest tensor.

Peers in the same run: safetensors' own safe_open (numpy) reading every tensor, and plain `import numpy` as the
process baseline. Goal: l4export's peak RSS < largest tensor + 300 MB.

    python benchmarks/bench_read_memory.py [--gb 2.2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, measure, save_result, scout_like_config, table, write_checkpoint  # noqa: E402

OURS_READ = """
import sys
from l4export.checkpoint import Checkpoint
n = 0
for t in Checkpoint(sys.argv[1]):
    a = t.load(); n += a.size; del a
print(n)
"""

PEER_SAFETENSORS = """
import sys, glob
from safetensors import safe_open
n = 0
for f in sorted(glob.glob(sys.argv[1] + '/*.safetensors')):
    with safe_open(f, 'pt') as st:
        for k in st.keys():
            a = st.get_tensor(k); n += a.numel(); del a
print(n)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12, help="12 layers of hidden 2048 / 16 experts of 1024 = ~2.4 GB")
    args = ap.parse_args()
    ckpt = write_checkpoint(WORK / f"scout-like-{args.layers}L", scout_like_config(2048, 1024, args.layers))
    from l4export.checkpoint import Checkpoint

    c = Checkpoint(ckpt)
    largest = max(s.nbytes for s in c.sources.values()) / 1024**2
    total = c.bytes_on_disk / 1024**2
    rows = [
        {"reader": "python + numpy (baseline)", **measure([sys.executable, "-c", "import numpy"])},
        {"reader": "l4export Checkpoint (read only)", **measure([sys.executable, "-c", OURS_READ, str(ckpt)])},
        {"reader": "l4export inspect --check", **measure([sys.executable, "-m", "l4export.cli", "inspect", str(ckpt), "--check"])},
        {"reader": "safetensors safe_open (torch)", **measure([sys.executable, "-c", PEER_SAFETENSORS, str(ckpt)])},
    ]
    for r in rows:
        r["rss_minus_largest_mb"] = round(r["peak_rss_mb"] - largest, 1)
        r.pop("output_tail")
    peer = rows[3]
    for r in rows[1:3]:
        r["rss_vs_safetensors"] = round(r["peak_rss_mb"] / peer["peak_rss_mb"], 2)
        r["time_vs_safetensors"] = round(r["wall_s"] / peer["wall_s"], 2)
    print(f"checkpoint: {total:.0f} MB in {len(c.files)} shards; largest tensor {largest:.0f} MB")
    print(table(rows, ["reader", "wall_s", "peak_rss_mb", "rss_minus_largest_mb", "time_vs_safetensors", "rss_vs_safetensors"]))
    ours = max(rows[1]["peak_rss_mb"], rows[2]["peak_rss_mb"])
    verdict = "PASS" if ours < largest + 300 else "FAIL"
    print(f"goal peak RSS < largest + 300 MB = {largest + 300:.0f} MB: {verdict} ({ours:.0f} MB)")
    path = save_result("read-memory", {"checkpoint_mb": round(total), "shards": len(c.files),
                                       "largest_tensor_mb": round(largest, 1), "rows": rows, "goal": verdict})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
