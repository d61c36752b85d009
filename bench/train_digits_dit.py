"""Train the step-cache benchmark models on scikit-learn's digits (CPU, a few minutes), ship the weights.

* a class-conditional DiT with the diffusers ``FluxTransformer2DModel`` architecture (tiny widths) trained
  with rectified-flow matching: ``x_t = (1 - t) x0 + t noise``, target velocity ``noise - x0``; classes enter
  as one learned "text" token and the pooled projection, class 10 is the null class for CFG;
* a small MLP digit classifier used to score generated images.

8x8 images in [-1, 1], packed 2x2 like Flux latents: 16 tokens of 4 channels. ``bench/stepcache.py``
imports the definitions from here. Run ``python bench/train_digits_dit.py --retrain`` to train again;
without ``--retrain`` it only reports the shipped weights (``./dev bench`` runs every bench script).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import torch
    from torch import nn
except ImportError:  # ./dev bench runs every script; this one needs the bench extra
    print("train_digits_dit: skipped, needs torch (pip install torch==2.13.0 -e .[bench])")
    sys.exit(0)

WEIGHTS = Path(__file__).resolve().parent / "weights"
DIT_FILE = WEIGHTS / "digits_flux_dit.safetensors"
CLS_FILE = WEIGHTS / "digits_classifier.safetensors"
NULL_CLASS = 10
DIT_CONFIG = dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_single_layers=4,
                  attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                  pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(8, 12, 12))


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as (N, 1, 8, 8) in [-1, 1] and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.tensor(d.target, dtype=torch.long)


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, 8, 8) -> (B, 16, 4): 2x2 patches as tokens, the layout Flux latents use."""
    b = x.shape[0]
    return x.view(b, 1, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 4)


def unpack(t: torch.Tensor) -> torch.Tensor:
    b = t.shape[0]
    return t.view(b, 4, 4, 1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 1, 8, 8)


class DigitsDiT(nn.Module):
    """Class embedding + diffusers FluxTransformer2DModel; ``forward(x_tokens, t, labels) -> velocity``."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers import FluxTransformer2DModel

        self.transformer = FluxTransformer2DModel(**DIT_CONFIG)
        self.class_tok = nn.Embedding(NULL_CLASS + 1, DIT_CONFIG["joint_attention_dim"])
        self.class_pool = nn.Embedding(NULL_CLASS + 1, DIT_CONFIG["pooled_projection_dim"])
        ids = torch.zeros(16, 3)
        ids[:, 1] = torch.arange(16) // 4
        ids[:, 2] = torch.arange(16) % 4
        self.register_buffer("img_ids", ids, persistent=False)
        self.register_buffer("txt_ids", torch.zeros(1, 3), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.transformer(hidden_states=x, encoder_hidden_states=self.class_tok(labels)[:, None],
                                pooled_projections=self.class_pool(labels), timestep=t, img_ids=self.img_ids,
                                txt_ids=self.txt_ids, return_dict=False)[0]


class DigitClassifier(nn.Module):
    """64 -> 256 -> 10 MLP on [-1, 1] pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.GELU(), nn.Dropout(0.2), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_models() -> tuple[DigitsDiT, DigitClassifier]:
    from safetensors.torch import load_file

    dit, clf = DigitsDiT(), DigitClassifier()
    dit.load_state_dict(load_file(DIT_FILE))
    clf.load_state_dict(load_file(CLS_FILE))
    return dit.eval(), clf.eval()


@torch.no_grad()
def sample(dit: nn.Module, labels: torch.Tensor, noise: torch.Tensor, steps: int = 30,
           cfg: float = 2.0) -> torch.Tensor:
    """Euler rectified-flow sampling from t=1 (noise) to t=0, CFG as one batch (cond + null)."""
    ts = torch.linspace(1.0, 0.0, steps + 1)
    x = noise.clone()
    b = labels.shape[0]
    lab = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    for i in range(steps):
        v = dit(torch.cat([x, x]), ts[i].expand(2 * b), lab)
        vc, vu = v.chunk(2)
        x = x + (ts[i + 1] - ts[i]) * (vu + cfg * (vc - vu))
    return unpack(x).clamp(-1, 1)


def train_classifier(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> tuple[DigitClassifier, float]:
    torch.manual_seed(seed)
    perm = torch.randperm(len(x))
    tr, te = perm[:1500], perm[1500:]
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-3)
    for _ in range(300):
        idx = tr[torch.randint(0, len(tr), (256,))]
        xb = x[idx] + 0.1 * torch.randn_like(x[idx])
        loss = nn.functional.cross_entropy(clf(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        acc = float((clf(x[te]).argmax(1) == y[te]).float().mean())
    return clf, acc


def train_dit(x: torch.Tensor, y: torch.Tensor, seconds: float, seed: int = 0) -> tuple[DigitsDiT, int, float]:
    torch.manual_seed(seed)
    dit = DigitsDiT().train()
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-3, weight_decay=0.0)
    x0_all = pack(x)
    start, it, ema = time.time(), 0, None
    while time.time() - start < seconds:
        idx = torch.randint(0, len(x0_all), (128,))
        x0, lab = x0_all[idx], y[idx].clone()
        lab[torch.rand(128) < 0.1] = NULL_CLASS
        t = torch.rand(128).pow(0.8)  # a bit more weight on the noisy end
        noise = torch.randn_like(x0)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        loss = nn.functional.mse_loss(dit(xt, t, lab), noise - x0)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        lv = loss.item()
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        it += 1
        if it % 200 == 0:
            print(f"  dit iter {it}  loss(ema) {ema:.4f}  {time.time() - start:.0f}s", flush=True)
    return dit.eval(), it, ema or 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--retrain", action="store_true", help="train again and overwrite the shipped weights")
    ap.add_argument("--seconds", type=float, default=300.0, help="DiT training time budget (CPU)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for this size, and on a shared, busy machine)")
    args = ap.parse_args()
    if DIT_FILE.exists() and CLS_FILE.exists() and not args.retrain:
        n = sum(v.numel() for v in load_models()[0].state_dict().values())
        print(f"train_digits_dit: shipped weights present ({n / 1e6:.2f}M DiT params); --retrain to train again")
        return 0
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    x, y = load_digits_tensor()
    clf, acc = train_classifier(x, y)
    print(f"classifier held-out accuracy: {acc:.3f}")
    dit, iters, loss = train_dit(x, y, args.seconds)
    print(f"DiT: {iters} iterations, final loss(ema) {loss:.4f}")
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, DIT_FILE)
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, CLS_FILE)
    with torch.no_grad():
        noise = torch.randn(100, 16, 4, generator=torch.Generator().manual_seed(1))
        gen = sample(dit, torch.arange(10).repeat(10), noise)
        gacc = float((clf(gen).argmax(1) == torch.arange(10).repeat(10)).float().mean())
    print(f"generated-image accuracy (100 samples, 30 steps): {gacc:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
