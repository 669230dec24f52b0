"""Host memory over an epoch of embedded-image rows: does it grow with the dataset?

Run: ``python benchmarks/data_memory.py [--sizes 2000 20000] [--image-size 0] [--batch-size 32]``.
For each size, writes the synthetic task as parquet (geometry3k's columns, every PNG embedded;
``make-data --format parquet``), then in a fresh process: ``R1V2DataModule`` reads it (validation
decodes every image once, the prompt-length filter reads every image's size), and one epoch of SFT
batches is collated with the tiny model's processor. Prints, per size: peak RSS (``VmHWM``), and
anonymous (heap) and file-backed resident memory after reading and after the epoch. File-backed
pages are the memory-mapped arrow table: page cache the kernel reclaims, not heap. Also prints what
keeping every image's pixel tensor would take. Not a test; 2,000 + 20,000 rows take a few minutes
on 2 cores.

Measured (2 shared CPU cores, the task's 32 px images, batch 32)::

       rows  parquet  peak RSS anon: start   read  epoch file: read  epoch  pixels kept  read s  epoch s
       2000    0.5Mi     502Mi       294Mi  353Mi  354Mi      140Mi  147Mi         23Mi    22.1     14.3
      20000    4.7Mi     583Mi       294Mi  423Mi  425Mi      150Mi  157Mi        234Mi    99.3     68.1

Over the epoch, memory stays where reading left it (+1-2 MiB). With ten times the rows, heap after
reading is 70 MiB larger: the records' text and annotations (about 4 KiB a row as Python dicts),
not pixels (keeping them would take 234 MiB more).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status() -> dict[str, int]:
    """Resident memory of this process in MiB, from /proc/self/status."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) // 1024
    return out


def child(path: str, batch_size: int) -> None:
    import torch

    from lightning_r1v2.data.datamodule import R1V2DataModule
    from lightning_r1v2.data.synthetic import COLUMNS
    from lightning_r1v2.models.tiny import build_processor

    torch.set_num_threads(1)
    processor = build_processor()
    start = _status()
    t0 = time.perf_counter()
    dm = R1V2DataModule(train_file=path, val_file=None, kind="sft", batch_size=batch_size, columns=COLUMNS["parquet"])
    dm.processor = processor
    dm.setup("fit")
    read_s = time.perf_counter() - t0
    after_read = _status()
    t0 = time.perf_counter()
    rows = pixels = 0
    for batch in dm.train_dataloader():
        rows += len(batch["records"])
        pixels += sum(m["pixel_values"].numel() * m["pixel_values"].element_size() for m in batch["media"])
    epoch_s = time.perf_counter() - t0
    print(json.dumps({"records": len(dm.train_records), "rows_in_epoch": rows, "pixel_bytes_in_epoch": pixels,
                      "read_s": read_s, "epoch_s": epoch_s, "start": start, "after_read": after_read,
                      "after_epoch": _status()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--image-size", type=int, default=0, help="image side in pixels (0: the task's 32)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.batch_size)
        return
    from lightning_r1v2.data.synthetic import make_data

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, HF_DATASETS_CACHE=str(Path(tmp) / "hf_cache"), OMP_NUM_THREADS="1")
        for n in args.sizes:
            out = Path(tmp) / f"n{n}"
            make_data(str(out), train=n, val=0, seed=0, image_size=args.image_size, format="parquet")
            path = out / "train.parquet"
            proc = subprocess.run([sys.executable, __file__, "--child", str(path), "--batch-size", str(args.batch_size)],
                                  env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["parquet_mib"] = path.stat().st_size / 2**20
            results.append(r)
    print(f"\n{'rows':>7} {'parquet':>8} {'peak RSS':>9} {'anon: start':>11} {'read':>6} {'epoch':>6} "
          f"{'file: read':>10} {'epoch':>6} {'pixels kept':>12} {'read s':>7} {'epoch s':>8}")
    for r in results:
        print(f"{r['records']:>7} {r['parquet_mib']:>6.1f}Mi {r['after_epoch']['VmHWM']:>7}Mi "
              f"{r['start']['RssAnon']:>9}Mi {r['after_read']['RssAnon']:>4}Mi {r['after_epoch']['RssAnon']:>4}Mi "
              f"{r['after_read']['RssFile']:>8}Mi {r['after_epoch']['RssFile']:>4}Mi "
              f"{r['pixel_bytes_in_epoch'] / 2**20:>10.0f}Mi {r['read_s']:>7.1f} {r['epoch_s']:>8.1f}")
    print("\npeak RSS: VmHWM of the process; anon: heap and other private memory; file: mapped files, the arrow "
          "table included (reclaimable page cache); pixels kept: what holding every processed pixel tensor of the "
          "epoch would take")


if __name__ == "__main__":
    main()
