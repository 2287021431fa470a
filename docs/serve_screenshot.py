"""Takes docs/serve.png: the page of `launch.py --mode=serve` on a test photo, in headless Chromium.

  python docs/serve_screenshot.py --workdir=workdir/demo [--output=docs/serve.png]

Starts the server on WORKDIR's level-1 parameters, uploads tests/data/photos/coffee.jpg with a
made-up depth map (near = bright towards the bottom, a table top seen from above), clicks the cup to
focus the classical render, and saves the window as a 64-colour palette PNG (small enough for the
repository). Needs Debian's chromium and the playwright package (`make test` installs both).
"""

import argparse
import io
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image
from playwright.sync_api import sync_playwright

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTO = os.path.join(ROOT, 'tests', 'data', 'photos', 'coffee.jpg')
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--output', default=os.path.join(ROOT, 'docs', 'serve.png'))
    parser.add_argument('--config', default='configs/default.py:demo')
    args = parser.parse_args()

    folder = tempfile.mkdtemp()
    depth_path = os.path.join(folder, 'coffee_depth.png')
    with Image.open(PHOTO) as photo:
        width, height = photo.size
    rows = np.linspace(40, 255, height // 2)[:, None].repeat(width // 2, axis=1)
    Image.fromarray(rows.astype(np.uint8)).save(depth_path)

    server = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'launch.py'), '--mode=serve', f'--workdir={args.workdir}',
         '--port=0', f'--config={args.config}'],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        url = None
        for line in server.stdout:
            if line.startswith('bokeh_jax serve: http://'):
                url = line.split()[2]
                break
        if url is None:
            sys.exit('the server stopped before printing its URL')
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path='/usr/bin/chromium',
                                                 args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={'width': 1200, 'height': 1000})
            page.goto(url)
            page.wait_for_function("document.getElementById('model-info').textContent.length > 40")
            page.set_input_files('#photo', PHOTO)
            page.set_input_files('#depth', depth_path)
            page.click('#render')
            page.wait_for_selector('#pynet-img[data-version="1"]', timeout=600_000)
            page.wait_for_selector('#classical-img[data-version="1"]', timeout=600_000)
            box = page.locator('#input-img').bounding_box()  # the cup, a little below the middle
            page.mouse.click(box['x'] + 0.5 * box['width'], box['y'] + 0.62 * box['height'])
            page.wait_for_selector('#classical-img[data-version="2"]', timeout=600_000)
            page.locator('#compare-slider').fill('40')
            png = page.screenshot()  # the window: panels and the top of the comparison
            browser.close()
    finally:
        server.terminate()
        server.wait()
    image = Image.open(io.BytesIO(png)).convert('RGB')
    image.quantize(64, method=Image.Quantize.MEDIANCUT).save(args.output, optimize=True)
    print(f'{args.output}: {image.width}x{image.height}, {os.path.getsize(args.output) // 1024} KiB')


if __name__ == '__main__':
    main()
