"""Screenshot of the demo page with a translation and its attention heatmap (docs/web-demo.png).

    python tests/web/screenshot.py --model models/multi30k-de-en --out docs/web-demo.png \
        --text "Ein Mann fährt Fahrrad." --source de --target en

starts ``mt-serve`` on a free loopback port with the model (which needs its ONNX graphs: ``mt-export DIR``),
or shoots a server that is already running with ``--server URL``. Needs Debian's Chromium at /usr/bin/chromium
(``apt-get install -y chromium``) and the ``playwright`` package (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

# headless.py next to this file; live_server.py (a real mt-serve on a free port) from the service tests.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "service"))

from headless import launch
from live_server import start_server

WAIT_MS = 60_000  # a first translation on a cold CPU model can take a while


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, action="append", help="model dir to serve (repeatable)")
    where.add_argument("--server", help="URL of a running server instead, e.g. http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, default=Path("docs/web-demo.png"), help="PNG to write")
    parser.add_argument("--text", required=True, help="text to translate")
    parser.add_argument("--source", help="source language (default: the page's first)")
    parser.add_argument("--target", help="target language (default: the page's first for the source)")
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--n-best", type=int, default=3, help="translations to show (alternatives after the first)")
    parser.add_argument("--view", choices=["subword", "word"], default="subword", help="heatmap view")
    parser.add_argument("--width", type=int, default=1000, help="viewport width in CSS pixels")
    parser.add_argument("--scale", type=float, default=1.0, help="device pixel ratio (2 for a sharper image)")
    return parser.parse_args(argv)


def shoot(url: str, args: argparse.Namespace) -> None:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": args.width, "height": 800}, device_scale_factor=args.scale)
        page.set_default_timeout(WAIT_MS)
        page.goto(url)
        page.wait_for_selector("#translate:enabled")
        if args.source:
            page.select_option("#source", args.source)
        if args.target:
            page.select_option("#target", args.target)
        page.fill("#text", args.text)
        page.fill("#beam-size", str(args.beam_size))
        page.fill("#n-best", str(args.n_best))
        page.click("#translate")
        page.wait_for_function(
            "() => !document.querySelector('#results').hidden || !document.querySelector('#error').hidden"
        )
        if page.is_visible("#error"):
            raise SystemExit(f"the page shows an error: {page.inner_text('#error')}")
        page.check(f'input[name="view"][value="{args.view}"]')
        page.evaluate("document.activeElement.blur()")  # no focus ring or hover outline in the picture
        page.mouse.move(0, 0)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=True)
        print(f"{args.out}: {page.inner_text('#translation')!r}")
        browser.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.server:
        shoot(args.server.rstrip("/"), args)
        return 0
    missing = [str(model) for model in args.model if not (model / "onnx").is_dir()]
    if missing:
        raise SystemExit(f"no ONNX graphs in {', '.join(missing)}: run `mt-export DIR` first")
    with tempfile.TemporaryDirectory() as tmp:
        models = [model.resolve() for model in args.model]
        server = start_server(["-m", "service.cli"], models, Path(tmp) / "server.log")
        try:
            shoot(server.url, args)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
