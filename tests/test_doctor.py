"""`autocloud doctor`: a ComfyUI checkout's folders read with ComfyUI's rules (extra_model_paths.yaml, legacy
names, the cache first), models on a volume ComfyUI will not see, an unwritable cache, a broken manifest, a
malformed proxy, Redis up and down; exit 1 when something is wrong, secrets masked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from redis_server import RedisServer
from servers import free_port

# The lines of ComfyUI v0.3.x's folder_paths.py that the doctor reads (same format, fewer folders); a real
# checkout is used as well when COMFYUI_PATH is set.
FOLDER_PATHS = '''
import os
base_path = os.path.dirname(os.path.realpath(__file__))
models_dir = os.path.join(base_path, "models")
folder_names_and_paths = {}
folder_names_and_paths["checkpoints"] = ([os.path.join(models_dir, "checkpoints")], supported_pt_extensions)
folder_names_and_paths["configs"] = ([os.path.join(models_dir, "configs")], [".yaml"])
folder_names_and_paths["loras"] = ([os.path.join(models_dir, "loras")], supported_pt_extensions)
folder_names_and_paths["vae"] = ([os.path.join(models_dir, "vae")], supported_pt_extensions)
folder_names_and_paths["text_encoders"] = ([os.path.join(models_dir, "text_encoders"), \
os.path.join(models_dir, "clip")], supported_pt_extensions)
folder_names_and_paths["diffusion_models"] = ([os.path.join(models_dir, "unet"), \
os.path.join(models_dir, "diffusion_models")], supported_pt_extensions)
folder_names_and_paths["custom_nodes"] = ([os.path.join(base_path, "custom_nodes")], set())
'''


def make_checkout(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "main.py").write_text("")
    (root / "folder_paths.py").write_text(FOLDER_PATHS)
    (root / "comfyui_version.py").write_text('__version__ = "0.3.64"\n')
    (root / "requirements.txt").write_text("comfyui-frontend-package==1.27.10\ntorch\n")
    (root / "models" / "checkpoints").mkdir(parents=True)
    return root


def doctor(tmp_path: Path, *args: str, **env: str) -> tuple[int, str, dict]:
    base = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k not in
            ("COMFYUI_PATH", "HF_TOKEN", "CIVITAI_TOKEN", "AUTOCLOUD_MANIFEST", "AUTOCLOUD_REDIS_URL")}
    base.update({"AUTOCLOUD_CONFIG": str(tmp_path / "none.yaml"), "AUTOCLOUD_CACHE": str(tmp_path / "cache"),
                 "COLUMNS": "200"})
    base.update(env)
    cmd = [sys.executable, "-m", "comfy_autocloud.cli.main", "doctor", *args]
    text = subprocess.run(cmd, env=base, capture_output=True, text=True, timeout=60)
    js = subprocess.run([*cmd, "--json"], env=base, capture_output=True, text=True, timeout=60)
    assert js.returncode == text.returncode, (text.stdout, js.stdout, js.stderr)
    return text.returncode, text.stdout + text.stderr, json.loads(js.stdout)


def checks(report: dict, name: str) -> list[dict]:
    return [c for c in report["checks"] if c["name"] == name]


def test_healthy_checkout_passes_and_shows_the_search_order(tmp_path: Path) -> None:
    comfy = make_checkout(tmp_path / "ComfyUI")
    (comfy / "models" / "checkpoints" / "sd.safetensors").write_bytes(b"x")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"loras": {"a.safetensors": "https://huggingface.co/o/r/resolve/main/a.safetensors"}}))
    rc, out, rep = doctor(tmp_path, "--comfyui", str(comfy), AUTOCLOUD_MANIFEST=str(manifest),
                          HF_TOKEN="hf_abcdefghijklmnopqrstuvwxyz0123456789")
    assert rc == 0 and rep["ok"] is True, out
    assert checks(rep, "ComfyUI")[0]["status"] == "ok" and "0.3.64" in checks(rep, "ComfyUI")[0]["detail"]
    cache = str(tmp_path / "cache")
    # ComfyUI's own order (unet before diffusion_models), the cache first, legacy folder names folded in
    assert rep["folders"]["diffusion_models"] == [f"{cache}/diffusion_models", f"{cache}/unet",
                                                  str(comfy / "models" / "unet"),
                                                  str(comfy / "models" / "diffusion_models")]
    assert "configs" not in rep["folders"] and "custom_nodes" not in rep["folders"]
    assert checks(rep, "manifest")[0] == {"name": "manifest", "status": "ok",
                                          "detail": f"1 entries parsed from {manifest}"}
    tokens = checks(rep, "tokens")[0]["detail"]
    assert "HF_TOKEN set (39 characters" in tokens and "hf_abc" not in out + json.dumps(rep)
    assert "all good" in out and "folders ComfyUI reads" in out


def test_volume_folders_comfyui_will_not_see_fail(tmp_path: Path) -> None:
    comfy = make_checkout(tmp_path / "ComfyUI")
    vol = tmp_path / "volume" / "models"
    for sub, name in (("checkpoints", "a.safetensors"), ("diffusion_models", "flux.safetensors"),
                      ("diffusion_models/sub", "b.gguf"), ("Lora", "style.safetensors")):
        (vol / sub).mkdir(parents=True, exist_ok=True)
        (vol / sub / name).write_bytes(b"x")
    (comfy / "extra_model_paths.yaml").write_text(
        f"runpod:\n  base_path: {vol}\n  checkpoints: checkpoints/\n  text_encoders: text_encoders/\n")
    rc, out, rep = doctor(tmp_path, "--comfyui", str(comfy))
    assert rc == 1 and rep["ok"] is False
    unseen = sorted(c["detail"] for c in checks(rep, "models ComfyUI will not see"))
    assert unseen == [
        f"1 model files in {vol / 'Lora'}: ComfyUI has no folder named 'Lora'; did you mean 'loras'?",
        f"2 model files in {vol / 'diffusion_models'}: add `diffusion_models: diffusion_models/` to the section "
        f"of extra_model_paths.yaml whose base_path is {vol}",
    ], unseen
    missing_dir = [c for c in checks(rep, "extra_model_paths") if c["status"] == "warn"]
    assert missing_dir and f"{vol / 'text_encoders'} does not exist" in missing_dir[0]["detail"]
    assert str(vol / "checkpoints") in rep["folders"]["checkpoints"]
    assert "problem(s) to fix" in out

    (comfy / "extra_model_paths.yaml").write_text(
        f"runpod:\n  base_path: {vol}\n  checkpoints: checkpoints/\n  diffusion_models: diffusion_models/\n"
        f"  loras: Lora/\n")
    rc, out, rep = doctor(tmp_path, "--comfyui", str(comfy))
    assert rc == 0 and not checks(rep, "models ComfyUI will not see"), out


def test_cache_manifest_and_proxy_problems_fail_and_name_the_thing(tmp_path: Path) -> None:
    comfy = make_checkout(tmp_path / "ComfyUI")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    rc, out, rep = doctor(tmp_path, "--comfyui", str(comfy), AUTOCLOUD_CACHE=str(blocker / "cache"),
                          AUTOCLOUD_MANIFEST=str(bad), HTTPS_PROXY="socks5://bob:pr0xy-pass-99@proxy:1080")
    assert rc == 1
    assert checks(rep, "cache")[0]["status"] == "fail" and str(blocker / "cache") in checks(rep, "cache")[0]["detail"]
    assert checks(rep, "manifest")[0]["status"] == "fail" and "broken.json" in checks(rep, "manifest")[0]["detail"]
    proxy = checks(rep, "proxy")[0]
    assert proxy["status"] == "fail" and "HTTPS_PROXY" in proxy["detail"] and "socks5" in proxy["detail"]
    assert "pr0xy-pass-99" not in out + json.dumps(rep)


def test_no_comfyui_found_fails(tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    proc = subprocess.run([sys.executable, "-m", "comfy_autocloud.cli.main", "doctor", "--json"], cwd=work,
                          env={**env, "AUTOCLOUD_CONFIG": str(tmp_path / "none.yaml"),
                               "AUTOCLOUD_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True, timeout=60)
    rep = json.loads(proc.stdout)
    assert proc.returncode == 1 and checks(rep, "ComfyUI")[0]["status"] == "fail"
    assert "COMFYUI_PATH" in checks(rep, "ComfyUI")[0]["detail"]


def test_proxy_in_use_is_shown_masked(tmp_path: Path) -> None:
    comfy = make_checkout(tmp_path / "ComfyUI")
    rc, out, rep = doctor(tmp_path, "--comfyui", str(comfy), HTTPS_PROXY="http://bob:pr0xy-pass-99@proxy:3128",
                          NO_PROXY="localhost,.internal")
    assert rc == 0
    assert checks(rep, "proxy")[0]["detail"] == ("http: direct; https: http://***@proxy:3128 (from HTTPS_PROXY); "
                                                 "direct for NO_PROXY=localhost,.internal")
    assert "pr0xy-pass-99" not in out + json.dumps(rep)


def test_fleet_redis_reachable_then_not(tmp_path: Path) -> None:
    if not RedisServer.available():
        pytest.skip("redis-server is not on PATH (apt-get install -y redis-server)")
    comfy = make_checkout(tmp_path / "ComfyUI")
    with RedisServer(tmp_path / "redis").start() as redis:
        rc, out, rep = doctor(tmp_path, "--comfyui", str(comfy), AUTOCLOUD_REDIS_URL=redis.url)
        assert rc == 0 and checks(rep, "fleet")[0]["status"] == "ok", out
        assert "0 nodes registered" in checks(rep, "fleet")[0]["detail"]
    dead = f"redis://:s3cret-redis-pw@127.0.0.1:{free_port()}/0"
    rc, out, rep = doctor(tmp_path, "--comfyui", str(comfy), AUTOCLOUD_REDIS_URL=dead)
    fleet = checks(rep, "fleet")[0]
    assert rc == 1 and fleet["status"] == "fail" and "unreachable" in fleet["detail"]
    assert "s3cret-redis-pw" not in out + json.dumps(rep)


def test_real_comfyui_checkout(tmp_path: Path) -> None:
    real = os.environ.get("COMFYUI_PATH")
    if not real or not (Path(real) / "folder_paths.py").is_file():
        pytest.skip("COMFYUI_PATH not set: the real checkout's folder_paths.py is not read")
    _, _, rep = doctor(tmp_path, "--comfyui", real)
    assert checks(rep, "ComfyUI")[0]["status"] in ("ok", "info")
    for name in ("checkpoints", "loras", "vae", "text_encoders", "diffusion_models", "upscale_models"):
        assert rep["folders"][name][0] == str(tmp_path / "cache" / name), name
