"""Makes docs/tensorboard.png: what a user sees in TensorBoard after `make demo`.

Runs the demo into a temporary run directory (or uses `--log-dir`), serves
it with a real `tensorboard` on 127.0.0.1 and photographs the given
dashboard with headless Chromium (Debian's `chromium` package).

    python docs/screenshot.py [--log-dir runs/demo] [--dashboard custom_scalars] [--out docs/tensorboard.png]
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", help="an existing run directory; default: run the demo first")
    parser.add_argument("--dashboard", default="custom_scalars")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tensorboard.png"))
    parser.add_argument("--chromium", default="chromium")
    parser.add_argument("--window-size", default="1600,1200",
                        help="width,height in pixels (a taller window shows the categories below)")
    args = parser.parse_args()
    log_dir = args.log_dir
    if log_dir is None:
        log_dir = tempfile.mkdtemp(prefix="gradmon-demo-")
        subprocess.run([sys.executable, "-m", "gradmon", "demo", "--log-dir", log_dir], check=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", log_dir, "--host",
                               "127.0.0.1", "--port", str(port), "--load_fast", "false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(3)  # let the first reload finish
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([
                args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
                f"--window-size={args.window_size}", "--virtual-time-budget=20000",
                f"--screenshot={os.path.abspath(args.out)}",
                f"http://127.0.0.1:{port}/#{args.dashboard}",
            ], check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"wrote {args.out}")
    finally:
        server.terminate()
        server.wait(timeout=20)


if __name__ == "__main__":
    main()
