"""ComfyUI adapter: the only package that imports ComfyUI (`folder_paths`, `comfy.utils`, `server`).

ComfyUI modules are imported lazily inside `setup` and `hooks`; everything else here (catalog,
download tracker, prefetch planning, status, metrics, routes) is plain Python so it is tested
without ComfyUI.
"""
