from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llmos.config import Settings
from llmos.platform import Platform
from tests.install_check import pytest_sessionfinish, pytest_terminal_summary  # noqa: F401  (hooks)
from tests.tiny_models import build_tiny_chat_model, build_tiny_encoder

ADMIN_KEY = "test-admin-key-0123456789"


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-qwen2"), architecture="qwen2")


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home", admin_key=ADMIN_KEY, dtype="float32", batch_wait_ms=20, allowed_hosts=["testserver"]
    )


@pytest.fixture
def platform(settings: Settings) -> Iterator[Platform]:
    p = Platform.open(settings)
    yield p
    p.close()


@pytest.fixture
def loaded_platform(platform: Platform, tiny_chat_dir: Path, tiny_encoder_dir: Path) -> Platform:
    platform.registry.pull(f"file:{tiny_chat_dir}", name="tiny-chat")
    platform.registry.pull(f"file:{tiny_encoder_dir}", name="tiny-embed")
    return platform
