"""examples/k8s: every manifest parses, references resolve, settings and the seed model list are valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from comfy_autocloud.config import SETTINGS, load_settings
from comfy_autocloud.manifest import load_manifest

K8S = Path(__file__).resolve().parent.parent / "examples" / "k8s"


def _docs() -> list[dict[str, Any]]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kust["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _docs() if d["kind"] == kind}


def test_every_document_is_a_named_object() -> None:
    docs = _docs()
    assert {d["kind"] for d in docs} >= {"Namespace", "Deployment", "Service", "ConfigMap", "Secret", "DaemonSet"}
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"]


def test_daemonset_wiring() -> None:
    ds = _by_kind("DaemonSet")["comfyui"]
    pod = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["cache"]["hostPath"]["path"].startswith("/mnt/nvme")
    assert volumes["ramdisk"]["emptyDir"]["medium"] == "Memory"
    configmaps, secrets = _by_kind("ConfigMap"), _by_kind("Secret")
    settings = configmaps["autocloud-config"]["data"]
    for c in pod["initContainers"] + pod["containers"]:
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, (c["name"], m["name"])
        for src in c.get("envFrom", []):
            assert src["configMapRef"]["name"] in configmaps
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets[ref["name"]]["stringData"]
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {settings["AUTOCLOUD_CACHE"], settings["AUTOCLOUD_TEMP_DIR"], settings["AUTOCLOUD_MANIFEST"]} <= mounts
    assert pod.get("shareProcessNamespace") is True  # in-use leases and reservations are pids in one namespace
    annotations = ds["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") == "true":  # scraping without a token needs the open /metrics
        assert annotations["prometheus.io/port"] == settings["AUTOCLOUD_PEER_PORT"]
        assert settings.get("AUTOCLOUD_PEER_METRICS_PUBLIC") in ("1", "true")
    ports = {p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
    assert int(settings["AUTOCLOUD_PEER_PORT"]) in ports
    redis = _by_kind("Service")["autocloud-redis"]
    assert f"//{redis['metadata']['name']}:{redis['spec']['ports'][0]['port']}/" in settings["AUTOCLOUD_REDIS_URL"]


def test_configmap_settings_and_seed_manifest_are_valid(tmp_path: Path) -> None:
    configmaps = _by_kind("ConfigMap")
    env = dict(configmaps["autocloud-config"]["data"])
    known = {s.env for s in SETTINGS}
    assert set(env) <= known, set(env) - known
    env["AUTOCLOUD_PEER_TOKEN"] = "x" * 32
    s = load_settings(env=env)
    assert s.temp_dir == "/autocloud-tmp" and s.manifest_dir == "/manifests"
    for name, text in configmaps["autocloud-seed-manifest"]["data"].items():
        path = tmp_path / name
        path.write_text(text)
        specs = load_manifest(path)
        assert any(sp.bundle is not None for sp in specs)
