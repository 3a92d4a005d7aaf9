"""Peak memory and time of a large VAE decode, full vs tiled (SD-1.5 autoencoder, random weights:
memory and time do not depend on weight values).

    python benchmarks/vae_tiling.py --res 1024 [--tile 64 --overlap 16] [--json out.json]

Each configuration runs in its own process so that its peak resident memory (ru_maxrss) is its own.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from report import emit


def run_one(res: int, tile: int | None, overlap: int) -> dict:
    import torch

    from ldm_engine.models import build_autoencoder, get_preset
    from ldm_engine.vae_tiling import decode_tiled

    torch.manual_seed(0)
    vae = build_autoencoder(get_preset("sd-1.5").vae).eval()
    z = torch.randn(1, 4, res // 8, res // 8)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with torch.no_grad():
        out = decode_tiled(vae.decode, z, 8, tile, overlap) if tile else vae.decode(z)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"res": res, "mode": f"tiled {tile}/{overlap}" if tile else "full", "decode_s": round(seconds, 2),
            "peak_rss_mb": round(peak / 1024), "added_peak_mb": round((peak - base) / 1024),
            "finite": bool(torch.isfinite(out).all())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--tile", type=int, default=64, help="latent tile side")
    p.add_argument("--overlap", type=int, default=16)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--one", choices=["full", "tiled"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(run_one(a.res, a.tile if a.one == "tiled" else None, a.overlap)))
        return 0
    rows = []
    for mode in ("full", "tiled"):
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--res", str(a.res), "--tile", str(a.tile),
                              "--overlap", str(a.overlap)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        emit(rows[-1:])
    full, tiled = rows
    print(f"tiled / full peak memory: {tiled['added_peak_mb'] / full['added_peak_mb']:.2f}; "
          f"time: {tiled['decode_s'] / full['decode_s']:.2f}")
    emit(rows, a.json, echo=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
