"""Resident memory of `llmos serve` while it takes large uploads (POST /v1/files).

Starts the real server on loopback with a fresh home, uploads valid chat JSONL files of each size
as one streamed multipart body, and samples the server's RSS throughout. An upload read whole
anywhere (the body, the file, the lines to validate) would add at least its own size; the table
shows how much the peak rose above the idle server, as a fraction of the upload's size.

    .venv/bin/python benchmarks/upload_memory.py [--sizes-mb 30 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import KEY, PeakRss, start_server, write_result

BOUNDARY = "llmos-upload-memory-benchmark"
LINE = (
    json.dumps({"messages": [{"role": "user", "content": "Say hello " * 20}, {"role": "assistant", "content": "hi"}]})
    + "\n"
).encode()
CHUNK_LINES = 256


def multipart(size: int) -> tuple[Iterator[bytes], int, int]:
    """A streamed multipart body holding a JSONL file of about ``size`` bytes: (chunks, length, records)."""
    records = max(1, size // len(LINE))
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        block = LINE * CHUNK_LINES
        for _ in range(records // CHUNK_LINES):
            yield block
        yield LINE * (records % CHUNK_LINES)
        yield tail

    return chunks(), len(head) + records * len(LINE) + len(tail), records


def upload(url: str, pid: int, size: int) -> dict[str, float | int]:
    body, length, records = multipart(size)
    headers = {
        "Authorization": f"Bearer {KEY}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(length),
    }
    with PeakRss(pid) as rss:
        time.sleep(1.0)  # a few idle samples first
        idle = rss._rss()
        start = time.perf_counter()
        reply = httpx.post(f"{url}/v1/files", content=body, headers=headers, timeout=1800)
        seconds = time.perf_counter() - start
        time.sleep(0.5)
    reply.raise_for_status()
    created = reply.json()
    if created["status"] != "processed" or created["records"] != records:
        raise SystemExit(f"unexpected upload result: {created}")
    growth = max(0, rss.peak - idle)
    return {
        "upload_bytes": created["bytes"],
        "records": records,
        "seconds": round(seconds, 2),
        "mb_per_s": round(created["bytes"] / seconds / 1e6, 1),
        "rss_idle_mb": round(idle / 2**20, 1),
        "rss_peak_mb": round(rss.peak / 2**20, 1),
        "rss_growth_mb": round(growth / 2**20, 1),
        "growth_per_upload_byte": round(growth / created["bytes"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[30, 300])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmos-upload-bench-") as home:
        proc, url = start_server(Path(home), env={"LLMOS_MAX_UPLOAD_BYTES": str(max(args.sizes_mb) * 2**21)})
        try:
            upload(url, proc.pid, 1 << 20)  # warm the upload path (imports, first database writes)
            rows = [upload(url, proc.pid, mb * 2**20) for mb in args.sizes_mb]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    header = f"{'upload':>10} {'seconds':>8} {'MB/s':>7} {'RSS idle':>9} {'RSS peak':>9} {'growth':>8}"
    print(f"{header} {'growth/size':>11}")
    for r in rows:
        print(
            f"{r['upload_bytes'] / 2**20:8.0f}MB {r['seconds']:8.1f} {r['mb_per_s']:7.1f} {r['rss_idle_mb']:7.0f}MB "
            f"{r['rss_peak_mb']:7.0f}MB {r['rss_growth_mb']:6.0f}MB {r['growth_per_upload_byte']:11.3f}"
        )
    write_result("upload_memory", {"rows": rows})


if __name__ == "__main__":
    main()
