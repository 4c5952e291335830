"""Regenerate docs/img/inspect.png: run the quick pipeline, write its `toss inspect` page, screenshot it.

    python scripts/screenshot_inspect.py                              # a fresh temporary store: about a minute
    python scripts/screenshot_inspect.py --store /tmp/inspect_store   # reuse a store the quick pipeline filled

Needs headless Chromium (Debian: `apt-get update && apt-get install -y chromium`). The pipeline stages are
cached in the store, so a second run with the same --store only rewrites the page and the screenshot.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 500_000  # keep the docs image small; larger screenshots are reduced to a 256-colour palette


def quick_mask(store: str) -> str:
    """The quick pipeline's mask artifact folder (computed, or reused from the store)."""
    from toss_core.config import load_config
    from toss_core.pipeline import run_pipeline

    cfg = load_config(ROOT / "configs" / "quick.yaml")
    cfg.store.url = store
    result = run_pipeline(cfg, progress=False,
                          on_stage=lambda name, o: print(f"  {name:<24} {'reused' if o.reused else 'computed'}"))
    return result.final["mask"].ref.uri


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise SystemExit("no headless Chromium found: install it (Debian: apt-get update && apt-get install -y chromium)")


def screenshot(page: Path, png: Path, width: int, height: int) -> None:
    with tempfile.TemporaryDirectory() as profile:  # a throwaway profile: nothing read from or left in $HOME
        subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={png}",
             page.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )
    if png.stat().st_size > MAX_BYTES:
        from PIL import Image  # comes with matplotlib

        Image.open(png).convert("RGB").quantize(256).save(png, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="artifact store for the quick pipeline (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "inspect.png", help="screenshot file")
    parser.add_argument("--html", type=Path, help="also keep the HTML page here")
    parser.add_argument("--samples", type=int, default=200, help="samples on the page")
    parser.add_argument("--size", default="1400,1800", help="browser window WIDTH,HEIGHT in pixels")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from flows.inspect_cmd import inspect

    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or str(Path(tmp) / "store")
        print(f"quick pipeline in {store}")
        mask = quick_mask(store)
        page = args.html or Path(tmp) / "report.html"
        inspect(mask=mask, tokens=None, model=None, utility=[], safety=[], samples=args.samples, ids=None,
                out=page, png_dir=None)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        width, height = (int(v) for v in args.size.split(","))
        screenshot(page, args.out, width, height)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} KB)")


if __name__ == "__main__":
    main()
