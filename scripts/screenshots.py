"""Screenshots of the viewer and the one-page report for the README (docs/img/), from a demo run folder,
and the viewer's file size at 20,000 sampled cells.

    sclens demo -o sclens_demo && python scripts/screenshots.py sclens_demo [--out docs/img]

Needs chromium on PATH and playwright (the `test` extra).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "img")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=ARGS)
        page = b.new_page(viewport={"width": 1280, "height": 900})
        page.goto((args.run_dir / "viewer.html").resolve().as_uri())
        page.wait_for_selector("#sclens-viewer .main-svg", timeout=60_000)
        page.screenshot(path=str(args.out / "viewer_stage.png"))
        page.select_option("#sclens-colour", "branch")
        page.check("#sclens-lens")
        page.screenshot(path=str(args.out / "viewer_lens_branch.png"))
        page = b.new_page(viewport={"width": 1280, "height": 1000})
        page.goto((args.run_dir / "sclens_report.html").resolve().as_uri())
        page.wait_for_selector("#sclens-viewer .main-svg", timeout=60_000)
        page.screenshot(path=str(args.out / "report_top.png"))
        for sec in ("bench0", "compress0"):
            page.locator(f"#{sec}").scroll_into_view_if_needed()
            page.screenshot(path=str(args.out / f"report_{sec.rstrip('0')}.png"))
        b.close()
    # file size at 20,000 sampled cells, two artifacts (the bound: < 10 MB)
    from sclens.datasets import simulate_hematopoiesis
    from sclens.viz import manifold_3d

    sim = simulate_hematopoiesis(n_donors=8, cells_per_donor=2_600, seed=0, donor_seed=7)  # the demo's biology
    arts = {"demo artifact": args.run_dir / "extracted_head.safetensors",
            "sparse": args.run_dir / "compress" / "artifacts" / "demo_sparse.safetensors"}
    view = manifold_3d(sim, arts, label_key="cell_type", donor_key="donor", tissue_key="tissue", n_cells=20_000)
    with tempfile.TemporaryDirectory() as tmp:
        size = view.save(Path(tmp) / "v.html").stat().st_size
    print(json.dumps({"viewer_bytes_20000_cells_2_artifacts": size, "screenshots": sorted(
        p.name for p in args.out.glob("*.png"))}))


if __name__ == "__main__":
    main()
