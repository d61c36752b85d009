# Sourced by warmup.sh and start_with_warmup.sh: pick a Python that can run the autocloud commands.
#
# The code: the checkout these scripts live in (<repo>/src) when there is one, else the installed
# package, else /workspace/ComfyUI-AutoCloud or $COMFYUI_PATH/custom_nodes/ComfyUI-AutoCloud.
# The interpreter, first that can import the package and all its dependencies
# (`python -m comfy_autocloud.cli.deps` answers that):
#   1. AUTOCLOUD_PYTHON (only that one when it is set)
#   2. the interpreter of the `autocloud` command on PATH (pip install comfyui-autocloud)
#   3. ComfyUI's venv: $COMFYUI_PATH/venv, then /workspace/venv (RunPod templates)
#   4. python3, then python, on PATH

AUTOCLOUD_RUNPOD_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export AUTOCLOUD_RUNPOD_DIR  # the default warmup list (warmup_models.conf) is looked up here too

_ac_use_src() { export PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}"; }
if [ -f "$AUTOCLOUD_RUNPOD_DIR/../src/comfy_autocloud/__init__.py" ]; then
    _ac_use_src "$(cd "$AUTOCLOUD_RUNPOD_DIR/../src" && pwd)"
else
    for _ac_dir in /workspace/ComfyUI-AutoCloud "${COMFYUI_PATH:-/workspace/ComfyUI}/custom_nodes/ComfyUI-AutoCloud"; do
        if [ -f "$_ac_dir/src/comfy_autocloud/__init__.py" ]; then
            _ac_src_fallback="$_ac_dir/src"
            break
        fi
    done
fi

_ac_candidates() {  # one interpreter path per line, in order of preference
    if [ -n "${AUTOCLOUD_PYTHON:-}" ]; then
        printf '%s\n' "$AUTOCLOUD_PYTHON"
        return
    fi
    local entry shebang
    entry="$(command -v autocloud 2>/dev/null || true)"
    if [ -n "$entry" ] && [ -f "$entry" ]; then
        IFS= read -r shebang < "$entry" || true
        case "$shebang" in
            '#!'*) shebang="${shebang#\#!}"; printf '%s\n' "${shebang%% *}" ;;
        esac
    fi
    printf '%s\n' "${COMFYUI_PATH:-/workspace/ComfyUI}/venv/bin/python" /workspace/venv/bin/python
    command -v python3 2>/dev/null || true
    command -v python 2>/dev/null || true
}

# _ac_check PY: empty output when PY can run the commands, else what it lacks.
_ac_check() {
    local out
    if out="$("$1" -m comfy_autocloud.cli.deps 2>&1)"; then
        return 0
    fi
    case "$out" in
        missing:*) printf '%s' "${out#missing: }" ;;
        *"No module named"*comfy_autocloud*) printf 'comfy_autocloud (the package itself)' ;;
        *) printf '%s' "$(printf '%s' "$out" | tail -n 1)" ;;
    esac
    return 1
}

PYTHON=""
_ac_tried=""
while IFS= read -r _ac_py; do
    [ -n "$_ac_py" ] || continue
    if [ ! -x "$_ac_py" ] && ! command -v "$_ac_py" >/dev/null 2>&1; then
        [ -n "${AUTOCLOUD_PYTHON:-}" ] && _ac_tried="$_ac_tried
  $_ac_py: not an executable"
        continue
    fi
    if _ac_why="$(_ac_check "$_ac_py")"; then
        PYTHON="$_ac_py"
        break
    fi
    if [ -n "${_ac_src_fallback:-}" ] && [ "$_ac_why" = "comfy_autocloud (the package itself)" ] \
        && ( _ac_use_src "$_ac_src_fallback"; _ac_check "$_ac_py" >/dev/null ); then
        _ac_use_src "$_ac_src_fallback"
        PYTHON="$_ac_py"
        break
    fi
    _ac_tried="$_ac_tried
  $_ac_py: missing $_ac_why"
done < <(_ac_candidates)

if [ -z "$PYTHON" ]; then
    {
        echo "autocloud: no Python here can run the autocloud commands.${_ac_tried:+ Tried:}$_ac_tried"
        [ -z "$_ac_tried" ] && echo "  (no interpreter found: none of AUTOCLOUD_PYTHON, autocloud, ComfyUI's venv, python3)"
        echo "  fix: pip install comfyui-autocloud   (into the Python that should run it; from a clone:"
        echo "       pip install -e /workspace/ComfyUI-AutoCloud), or point AUTOCLOUD_PYTHON=/path/to/python"
        echo "       at an interpreter that has it"
    } >&2
    exit 1
fi
unset -f _ac_use_src _ac_candidates _ac_check
unset _ac_dir _ac_py _ac_why _ac_tried _ac_src_fallback
