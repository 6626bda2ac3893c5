"""Every module of the platform imported into one process leaves llama.cpp able to load a GGUF.

Native libraries can clash in one process: usearch (statically linked with its own C++ runtime),
once imported, made llama.cpp's vocabulary loader fail with std::bad_cast for every model, so
the vector stores moved to FAISS. This imports every module in a fresh interpreter and then
loads the tiny GGUF."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import write_tiny_gguf

pytest.importorskip("llama_cpp")

SCRIPT = """
import importlib, pkgutil, sys
import llmos
for module in pkgutil.walk_packages(llmos.__path__, "llmos."):
    if ".migrations" not in module.name and module.name != "llmos.__main__":
        importlib.import_module(module.name)
import llama_cpp
llama_cpp.Llama(model_path=sys.argv[1], verbose=False, n_ctx=64)
print("loaded")
"""


def test_a_gguf_loads_after_every_module_is_imported(tiny_chat_dir: Path, tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tiny_chat_dir, tmp_path / "tiny-chat.F32.gguf")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(gguf)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-2000:]
