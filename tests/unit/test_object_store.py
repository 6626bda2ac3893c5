"""The S3-compatible artifact store against moto's S3 server on loopback."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

from llmos.errors import ArtifactError, InvalidRequestError, ServiceUnavailableError  # noqa: E402
from llmos.registry.object_store import S3ArtifactStore, open_artifact_store, parse_s3_uri  # noqa: E402
from llmos.registry.store import LocalArtifactStore  # noqa: E402
from tests.live_server import free_port  # noqa: E402

BUCKET = "llmos-test"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    yield client
    for obj in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def _store(tmp_path: Path, endpoint: str, cache_bytes: int = 1 << 20) -> S3ArtifactStore:
    return S3ArtifactStore(
        f"s3://{BUCKET}/team/a", local_root=tmp_path / "local", cache_bytes=cache_bytes, endpoint_url=endpoint
    )


def test_blob_round_trip_through_the_bucket(tmp_path: Path, s3_endpoint: str, bucket: object) -> None:
    store = _store(tmp_path, s3_endpoint)
    digest = store.put_chunks([b"hello ", b"bucket"])
    assert digest == hashlib.sha256(b"hello bucket").hexdigest()
    key = f"team/a/sha256/{digest[:2]}/{digest}"
    assert bucket.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"hello bucket"  # type: ignore[attr-defined]
    assert store.exists(digest)
    assert [d for d, _ in store.blobs()] == [digest]

    fresh = _store(tmp_path / "other-machine", s3_endpoint)  # nothing cached: read from the bucket
    assert fresh.local_path(digest).read_bytes() == b"hello bucket"
    assert fresh.put_chunks([b"hello bucket"]) == digest  # an existing blob is claimed, not uploaded again
    assert len(list(fresh.blobs())) == 1

    fresh.delete(digest)
    assert not fresh.exists(digest)
    with pytest.raises(ArtifactError, match="missing"):
        _store(tmp_path / "third", s3_endpoint).local_path(digest)


def test_a_corrupt_object_is_refused_and_not_cached(tmp_path: Path, s3_endpoint: str, bucket: object) -> None:
    digest = _store(tmp_path, s3_endpoint).put_chunks([b"the real bytes"])
    key = f"team/a/sha256/{digest[:2]}/{digest}"
    bucket.put_object(Bucket=BUCKET, Key=key, Body=b"tampered bytes")  # type: ignore[attr-defined]
    reader = _store(tmp_path / "reader", s3_endpoint)
    with pytest.raises(ArtifactError, match="corrupt") as caught:
        reader.local_path(digest)
    assert caught.value.code == "hash_mismatch"
    assert not any(p.is_file() for p in (tmp_path / "reader" / "local" / "cache").rglob("*"))


def test_the_local_cache_stays_within_its_bound(tmp_path: Path, s3_endpoint: str, bucket: object) -> None:
    store = _store(tmp_path, s3_endpoint, cache_bytes=3000)
    blobs = [bytes([i]) * 1000 for i in range(6)]
    digests = [store.put_chunks([b]) for b in blobs]
    cached = [p for p in (tmp_path / "local" / "cache").glob("??/*")]
    assert sum(p.stat().st_size for p in cached) <= 3000
    for data, digest in zip(blobs, digests, strict=True):  # evicted ones come back from the bucket
        assert store.local_path(digest).read_bytes() == data
        assert sum(p.stat().st_size for p in (tmp_path / "local" / "cache").glob("??/*")) <= 3000


def test_an_unreachable_endpoint_is_a_503(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = S3ArtifactStore(
        f"s3://{BUCKET}", local_root=tmp_path, cache_bytes=1 << 20, endpoint_url=f"http://127.0.0.1:{free_port()}"
    )
    store._client.meta.config.retries = {"max_attempts": 1}
    with pytest.raises(ServiceUnavailableError, match="unreachable"):
        store.local_path("a" * 64)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("uri", ["s3://", "s3:///prefix", "gs://bucket", "s3://bucket/p?x=1"])
def test_bad_store_uris_are_refused(uri: str) -> None:
    with pytest.raises(InvalidRequestError):
        parse_s3_uri(uri)


def test_the_default_store_is_the_local_directory(tmp_path: Path) -> None:
    assert isinstance(open_artifact_store("", local_root=tmp_path, cache_bytes=1), LocalArtifactStore)


def test_files_api_on_an_s3_store(tmp_path: Path, s3_endpoint: str, bucket: object) -> None:
    """The platform's files live in the bucket: uploaded, read back, and gone from it when deleted."""
    import openai
    from fastapi.testclient import TestClient

    from llmos.api import create_app
    from llmos.config import Settings
    from llmos.platform import Platform
    from tests.conftest import ADMIN_KEY

    settings = Settings(
        home=tmp_path / "home",
        admin_key=ADMIN_KEY,
        allowed_hosts=["testserver"],
        artifact_store=f"s3://{BUCKET}/platform",
        s3_endpoint_url=s3_endpoint,
    )
    platform = Platform.open(settings)
    try:
        with TestClient(create_app(platform=platform)) as http:
            client = openai.OpenAI(base_url="http://testserver/v1", api_key=ADMIN_KEY, http_client=http, max_retries=0)
            line = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
            uploaded = client.files.create(file=("train.jsonl", line * 3), purpose="fine-tune")
            keys = [o["Key"] for o in bucket.list_objects_v2(Bucket=BUCKET)["Contents"]]  # type: ignore[attr-defined]
            assert keys == [
                f"platform/sha256/{hashlib.sha256(line * 3).hexdigest()[:2]}/{hashlib.sha256(line * 3).hexdigest()}"
            ]
            assert client.files.content(uploaded.id).read() == line * 3
            client.files.delete(uploaded.id)
            assert "Contents" not in bucket.list_objects_v2(Bucket=BUCKET)  # type: ignore[attr-defined]
    finally:
        platform.close()
