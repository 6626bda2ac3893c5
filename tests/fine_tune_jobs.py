"""Fine-tuning jobs as tests set them up through the platform, shared by the test modules that
need one running (the artifact store's checkpoints, pre-training's resume)."""

from __future__ import annotations

import json

from llmos.platform import Platform

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(4)
]


def upload_chat_file(platform: Platform) -> str:
    """A small chat training file (``CHAT_ROWS``) uploaded for fine-tuning: its file id."""
    data = "\n".join(json.dumps(r) for r in CHAT_ROWS).encode()
    record, _ = platform.files.create(
        tenant="default", purpose="fine-tune", filename="t.jsonl", chunks=[data], max_bytes=1 << 20
    )
    return record.id


def running_job(platform: Platform) -> str:
    """A job on ``tiny-chat`` claimed by its first attempt (as a worker holds it): its id."""
    job = platform.jobs.create(
        tenant="default", body={"model": "tiny-chat", "training_file": upload_chat_file(platform)}
    )
    assert platform.jobs.claim(job.id) == 1
    return job.id
