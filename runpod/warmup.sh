#!/usr/bin/env bash
# Copy the models in warmup_models.conf from the network volume to local NVMe.
#   ./warmup.sh [CONF] [--status|--clean|--list|--setup-only] [--background] [--json]
# Environment: COMFYUI_PATH (/workspace/ComfyUI), CACHE_PATH (/root/fast_cache), WARMUP_CONFIG (warmup_models.conf).
# Everything is done by `autocloud warmup`; this file only finds it.
set -euo pipefail
# shellcheck source=_autocloud_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_autocloud_env.sh"
exec "$PYTHON" -m comfy_autocloud.cli.main warmup "$@"
