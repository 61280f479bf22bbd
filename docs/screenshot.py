"""Makes the README images: what a user sees in TensorBoard after `make demo`.

Runs the demo into `runs/demo` under a scratch directory (or uses `--log-dir`),
serves it with a real `tensorboard` started in that directory with the
neutral path `--logdir runs/demo` (the path TensorBoard shows), and
photographs each dashboard with headless Chromium (Debian's `chromium`
package): the custom scalars (docs/tensorboard.png) and the Text tab with
gradmon's health report (docs/tensorboard_report.png).

    python docs/screenshot.py [--log-dir runs/demo] [--epochs 8]
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
# dashboard -> (image, window size: a taller window shows more charts)
SHOTS = {
    "custom_scalars": (os.path.join(HERE, "tensorboard.png"), "1600,1500"),
    "text": (os.path.join(HERE, "tensorboard_report.png"), "1600,1300"),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", help="an existing run directory; default: run the demo into runs/demo")
    parser.add_argument("--epochs", type=int, default=8, help="demo epochs (default: 8)")
    parser.add_argument("--chromium", default="chromium")
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="gradmon-screenshot-")
    try:
        if args.log_dir is None:  # a neutral path: runs/demo, relative to where tensorboard runs
            subprocess.run([sys.executable, "-m", "gradmon", "demo", "--log-dir", "runs/demo",
                            "--epochs", str(args.epochs)], check=True, cwd=scratch)
            cwd, log_dir = scratch, "runs/demo"
        else:
            cwd, log_dir = os.path.dirname(os.path.abspath(args.log_dir)), os.path.basename(
                os.path.abspath(args.log_dir))
        shoot(args.chromium, cwd, log_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def shoot(chromium, cwd, log_dir):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", log_dir, "--host",
                               "127.0.0.1", "--port", str(port), "--load_fast", "false"],
                              cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(5)  # let the first reload finish
        for dashboard, (out, size) in SHOTS.items():
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run([
                    chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
                    f"--window-size={size}", "--virtual-time-budget=30000",
                    f"--screenshot={out}", f"http://127.0.0.1:{port}/#{dashboard}",
                ], check=True, timeout=240, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(f"wrote {out}")
    finally:
        server.terminate()
        server.wait(timeout=20)


if __name__ == "__main__":
    main()
