#!/usr/bin/env bash
# Warm up, then run ComfyUI with health checks and automatic restarts.
#   ./start_with_warmup.sh [--skip-warmup|--warmup-only] [--highvram|--lowvram] [-- extra ComfyUI args]
# Environment: COMFYUI_PATH, CACHE_PATH, WARMUP_CONFIG, SKIP_WARMUP (1 = skip),
#              COMFYUI_ARGS (default "--listen --disable-metadata").
# Everything is done by `autocloud start`; this file only finds it.
set -euo pipefail
# shellcheck source=_autocloud_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_autocloud_env.sh"
exec "$PYTHON" -m comfy_autocloud.cli.start_cmd "$@"
