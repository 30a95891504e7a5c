#!/usr/bin/env bash
# Compress a full fine-tune into a delta against its base, inspect it, push it to a running store and use it.
#
#   examples/compress_and_push.sh BASE_DIR FT_DIR NAME [extra `deltazip compress` flags, e.g. --bits 2]
#
# BASE_DIR / FT_DIR: Hugging Face folders (config.json + *.safetensors + tokenizer) of the same architecture.
# Needs a running stack: $DELTAZIP_STORE (default 127.0.0.1:50052) and $DELTAZIP_SCHEDULER (default
# 127.0.0.1:50051), e.g. from `python examples/local_stack.py` or `docker compose up`.
set -euo pipefail

if [ $# -lt 3 ]; then
    sed -n '2,9p' "$0"; exit 2
fi
BASE=$1; FT=$2; NAME=$3; shift 3
OUT=$(mktemp -d)/"$NAME"
DELTAZIP=${DELTAZIP:-python -m deltazip}
cd "$(dirname "$0")/.."
export PYTHONPATH=${PYTHONPATH:-.}

# 1. Delta = FT - BASE, 2:4 sparse + 4-bit groups chosen with OBS updates on calibration activations.
$DELTAZIP compress "$BASE" "$FT" -o "$OUT" --bits 4 --sparsity 2:4 --group-size 128 "$@"
# 2. Compression ratio and per-layer error.
$DELTAZIP inspect "$OUT"
# 3. Upload (sha256-checked, atomic); replaces a model of the same name, which workers then drop from their caches.
$DELTAZIP push "$OUT" --name "$NAME" --overwrite
# 4. Servable at once, no restart.
$DELTAZIP models
$DELTAZIP generate --model "$NAME" "Hello! What can you do?"
