"""The loss kernels alone, forward and backward, on small awkward shapes in every mode, with and
without masking and hard negatives: what tools/gpu_check.sh runs under compute-sanitizer.

    python tools/gpu_kernel_smoke.py [--device cuda]
"""

from __future__ import annotations

import argparse
import sys

import hardneg
import torch
import torch.nn.functional as F


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    device = torch.device(ap.parse_args(argv).device)
    g = torch.Generator().manual_seed(0)
    runs = 0
    for mode in ("infonce", "llave", "ega"):
        for B, D, M in ((1, 59, 0), (33, 64, 2), (257, 128, 1), (3, 16, 400)):  # N up to 1203
            q = F.normalize(torch.randn(B, D, generator=g), dim=-1).to(device).requires_grad_()
            t = F.normalize(torch.randn(B, D, generator=g), dim=-1).to(device).requires_grad_()
            h = F.normalize(torch.randn(B, M, D, generator=g), dim=-1).to(device) if M else None
            for masked in (False, True):
                ids = (torch.arange(B) % max(1, B - 3)).to(device) if masked else None
                h_ids = (
                    torch.randint(0, B, (B, M), generator=g).to(device) if masked and M else None
                )
                loss = hardneg.fused_hardneg_loss(
                    q, t, hard_negatives=h, target_ids=ids, hard_negative_ids=h_ids, mode=mode
                )
                loss.backward()
                if not torch.isfinite(loss).item():
                    print(f"non-finite loss: mode {mode} B {B} D {D} M {M} masked {masked}")
                    return 1
                runs += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"kernel smoke: {runs} losses and gradients on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
