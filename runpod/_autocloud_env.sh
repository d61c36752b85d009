# Sourced by warmup.sh and start_with_warmup.sh: pick a Python that can import comfy_autocloud.
# Order: the checkout these scripts live in (<repo>/src), an installed package (pip install),
# /workspace/ComfyUI-AutoCloud, $COMFYUI_PATH/custom_nodes/ComfyUI-AutoCloud.
# Override the interpreter with AUTOCLOUD_PYTHON=/path/to/python.

AUTOCLOUD_RUNPOD_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export AUTOCLOUD_RUNPOD_DIR  # the default warmup list (warmup_models.conf) is looked up here too

PYTHON="${AUTOCLOUD_PYTHON:-$(command -v python3 || command -v python || true)}"
if [ -z "$PYTHON" ]; then
    echo "autocloud: no python3 on PATH (set AUTOCLOUD_PYTHON)" >&2
    exit 127
fi

_ac_use_src() { export PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}"; }
if [ -f "$AUTOCLOUD_RUNPOD_DIR/../src/comfy_autocloud/__init__.py" ]; then
    _ac_use_src "$(cd "$AUTOCLOUD_RUNPOD_DIR/../src" && pwd)"
elif ! "$PYTHON" -c "import comfy_autocloud" 2>/dev/null; then
    for _ac_dir in /workspace/ComfyUI-AutoCloud "${COMFYUI_PATH:-/workspace/ComfyUI}/custom_nodes/ComfyUI-AutoCloud"; do
        if [ -f "$_ac_dir/src/comfy_autocloud/__init__.py" ]; then
            _ac_use_src "$_ac_dir/src"
            break
        fi
    done
fi
if ! "$PYTHON" -c "import comfy_autocloud, click, yaml" 2>/dev/null; then
    echo "autocloud: $PYTHON cannot import comfy_autocloud and its dependencies." >&2
    echo "  install: pip install comfyui-autocloud   (or from a clone: pip install -e /workspace/ComfyUI-AutoCloud)" >&2
    exit 1
fi
unset -f _ac_use_src
unset _ac_dir
