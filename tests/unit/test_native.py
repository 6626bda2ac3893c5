"""The native kernels build once per source, compiler and CPU into the kernel cache, and where they
cannot be built the engine says so and keeps its PyTorch path."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from llmos.engine.torch_backend import native
from llmos.engine.torch_backend.lora_expand import LoraExpand


def test_a_kernel_is_built_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_configured_dir", tmp_path / "kernels")
    library = native._build_and_load("lora_expand")
    assert library is not None and hasattr(library, "lora_expand_bf16")
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("lora_expand-") and built[0].suffix == ".so"

    def no_compiling(*args: object) -> None:
        raise AssertionError("built again")

    monkeypatch.setattr(native, "_compile", no_compiling)
    assert native._build_and_load("lora_expand") is not None  # the cached build, loaded
    assert list((tmp_path / "kernels").iterdir()) == built  # no partial files left behind


def test_without_a_working_compiler_the_torch_path_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(native, "_configured_dir", tmp_path / "kernels")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails every build
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native._build_and_load("lora_expand") is None
    assert "could not be built" in caplog.text and "PyTorch path" in caplog.text
    assert not any(p.suffix == ".so" for p in tmp_path.rglob("*"))  # nothing half-written kept
    assert not list((tmp_path / "tmp").iterdir())  # nor the private directory it tried

    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native._build_and_load("lora_expand") is None
    assert "no C compiler" in caplog.text


def test_the_kernel_is_offered_only_for_the_dtypes_it_has() -> None:
    assert LoraExpand.load(torch.float16) is None
    assert LoraExpand.load(torch.bfloat16) is not None, "the native kernel did not build (is cc installed?)"


def test_a_kernel_is_never_loaded_from_a_directory_others_may_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could have put a library there under the expected name
    monkeypatch.setattr(native, "_configured_dir", shared)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path / "tmp"))
    assert native._build_and_load("lora_expand") is not None
    assert not list(shared.iterdir())  # built in a private directory instead, removed once loaded
    assert not list((tmp_path / "tmp").iterdir())
    made: list[Path] = []
    mkdtemp = native.tempfile.mkdtemp

    def recording(**kwargs: str) -> str:
        made.append(Path(mkdtemp(**kwargs)))
        return str(made[-1])

    monkeypatch.setattr(native.tempfile, "mkdtemp", recording)
    monkeypatch.setattr(native, "_compile", lambda *args: (_ for _ in ()).throw(OSError("stop here")))
    assert native._build_and_load("lora_expand") is None
    assert made and all(not p.exists() for p in made)


def test_an_unexpected_failure_falls_back_too(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(native, "_configured_dir", None)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(native.Path, "home", staticmethod(no_home))
    assert native._build_and_load("lora_expand") is None
