"""ComfyUI on Modal with models preloaded into a memory snapshot (ComfyUI-AutoCloud memory preload).

    modal deploy examples/modal/comfyui_app.py

Cold start in two phases (Modal `enable_memory_snapshot=True`):

* `@modal.enter(snap=True)` runs once, before the snapshot: ComfyUI starts with this pack, the pack
  preloads every model of `preload_config.json` into CPU RAM (`AUTOCLOUD_PRELOAD_BLOCKING=1`, then
  `snapshot.load_all(device="cpu")` to be sure nothing is still loading). The snapshot carries them.
* `@modal.enter(snap=False)` runs after every restore: `snapshot.to_gpu()` puts them on the GPU and runs
  each once on a tiny input (CUDA/cuBLAS set-up and first-call costs paid before the first request;
  `AUTOCLOUD_PRELOAD_WARMUP=0` skips that).

A workflow then uses the "Cached … Loader" / "Preloaded … Selector" nodes and its loaders take
milliseconds instead of seconds. ComfyUI chooses its torch device when it starts, so it must see the
GPU in the snap=True phase: this app asks for Modal's GPU memory snapshots
(`experimental_options={"enable_gpu_snapshot": True}`, alpha). Models live on a Volume at
/models (ComfyUI's `extra_model_paths.yaml` points there); a missing one listed in
AUTOCLOUD_MANIFEST is downloaded into the AutoCloud cache on first use.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import modal

COMFY_DIR = "/root/comfy/ComfyUI"
PORT = 8188
URL = f"http://127.0.0.1:{PORT}"
PRELOAD_CONFIG = {
    "version": "1.0",
    "description": "models held in the memory snapshot",
    "models": {
        "checkpoints": [{"name": "dreamshaper_8.safetensors", "cache_key": "", "enabled": True}],
        "text_encoders": [],
        "diffusion_models": [],
        "vaes": [],
    },
    "settings": {"auto_gpu_load": False, "verbose": True},  # the GPU phase below moves them
}

image = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install("git")
    .pip_install("comfy-cli==1.5.1")
    .run_commands("comfy --skip-prompt install --fast-deps --nvidia")
    .run_commands(f"git clone https://github.com/comfyui-autocloud/ComfyUI-AutoCloud {COMFY_DIR}/custom_nodes/"
                  f"ComfyUI-AutoCloud && pip install -e {COMFY_DIR}/custom_nodes/ComfyUI-AutoCloud")
    .run_commands(f"mkdir -p {COMFY_DIR}/user && echo '{json.dumps(PRELOAD_CONFIG)}' > "
                  f"{COMFY_DIR}/user/preload_config.json")
    .run_commands(f"printf 'volume:\\n  base_path: /models\\n  checkpoints: checkpoints\\n  vae: vae\\n"
                  f"  text_encoders: text_encoders\\n  diffusion_models: diffusion_models\\n  loras: loras\\n'"
                  f" > {COMFY_DIR}/extra_model_paths.yaml")
    .env({"AUTOCLOUD_PRELOAD_BLOCKING": "1", "AUTOCLOUD_CACHE": "/models/.autocloud-cache"})
)
models = modal.Volume.from_name("comfyui-models", create_if_missing=True)
app = modal.App("comfyui-autocloud-preload", image=image)


def _wait_ready(timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{URL}/system_stats", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"ComfyUI did not answer on {URL} in {timeout}s")


@app.cls(gpu="L40S", volumes={"/models": models}, enable_memory_snapshot=True,
         experimental_options={"enable_gpu_snapshot": True}, scaledown_window=300)
class ComfyUI:
    @modal.enter(snap=True)
    def load_to_cpu(self) -> None:
        """Before the snapshot: start ComfyUI (blocking preload) and make sure every model is in RAM."""
        from comfy_autocloud.preload import snapshot

        self.proc = subprocess.Popen(["python", "main.py", "--listen", "127.0.0.1", "--port", str(PORT)],
                                     cwd=COMFY_DIR)
        _wait_ready()
        status = snapshot.load_all(device="cpu", url=URL)
        print(f"preloaded {status['counts']['ready']} models, {status['bytes_held'] / 2**30:.1f} GiB in RAM; "
              f"failed: {[e['name'] for e in status['entries'] if e['state'] == 'failed']}")

    @modal.enter(snap=False)
    def move_to_gpu(self) -> None:
        """After every restore: the preloaded models go onto the GPU before the first request."""
        from comfy_autocloud.preload import snapshot

        moved = snapshot.to_gpu(url=URL)
        print(f"on the GPU: {moved['devices']}")

    @modal.method()
    def run(self, workflow_api: dict[str, Any], timeout: float = 600.0) -> list[bytes]:
        """Queue an API-format workflow and return the PNG bytes of every saved image."""
        req = urllib.request.Request(f"{URL}/prompt", data=json.dumps({"prompt": workflow_api}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        prompt_id = json.loads(urllib.request.urlopen(req).read())["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = json.loads(urllib.request.urlopen(f"{URL}/history/{prompt_id}").read()).get(prompt_id)
            if hist and hist.get("status", {}).get("completed"):
                out = Path(COMFY_DIR) / "output"
                return [(out / img["subfolder"] / img["filename"]).read_bytes()
                        for node in hist["outputs"].values() for img in node.get("images", [])]
            if hist and hist.get("status", {}).get("status_str") == "error":
                raise RuntimeError(f"workflow failed: {hist['status']}")
            time.sleep(0.2)
        raise TimeoutError(f"workflow not done in {timeout}s")


@app.local_entrypoint()
def main(workflow: str = "workflow_api.json") -> None:
    images = ComfyUI().run.remote(json.loads(Path(workflow).read_text()))
    for i, data in enumerate(images):
        Path(f"comfyui_{i}.png").write_bytes(data)
    print(f"saved {len(images)} images")
