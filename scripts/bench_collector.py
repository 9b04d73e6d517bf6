#!/usr/bin/env python3
"""Training throughput with no collector, a fast one and one that trickles (issue #27 item 8).

The trickling collector takes each POST and answers one byte every 2 s, never finishing:
training must not wait for it. Alternating repetitions; samples/s from the last progress
line of each run. The collectors run in this process, on the same cores as the ranks.

    python scripts/bench_collector.py DATASET.h5 --reps 4 --epochs 300
"""

import argparse
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def trickling_collector():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)

    def answer(conn):
        with conn:
            try:
                conn.recv(1 << 20)
                for byte in b"HTTP/1.1 200 OK\r\n":
                    time.sleep(2)
                    conn.sendall(bytes([byte]))
            except OSError:
                pass

    def serve():
        while True:
            conn, _ = server.accept()
            threading.Thread(target=answer, args=(conn,), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}/"


class Fast(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def fast_collector():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Fast)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    urls = {"no collector": None, "fast collector": fast_collector(),
            "trickling collector": trickling_collector()}
    rates = {name: [] for name in urls}
    work = Path(tempfile.mkdtemp(prefix="bench-collector-"))
    for _ in range(args.reps):
        for name, url in urls.items():
            job = work / "job.toml"
            job.write_text(f'[data]\npath = "{args.dataset.resolve()}"\n[model]\nkind = "mlp"\n'
                           f'hidden = [16]\n[optimizer]\nlearning_rate = 0.1\nmomentum = 0.9\n'
                           f'[train]\nglobal_batch = 64\nepochs = {args.epochs}\n[output]\n'
                           f'run_dir = "{work / "run"}"\nprogress_interval_s = 1000\n'
                           f'metrics_flush_steps = 20\n' + (f'http_url = "{url}"\n' if url else ""))
            done = subprocess.run([str(ROOT / "scripts" / "mpirun"), "-n", str(args.ranks),
                                   sys.executable, "-m", "granger_mpi", "train", str(job), "--overwrite"],
                                  capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise SystemExit(f"{name}: exit {done.returncode}\n{done.stdout}\n{done.stderr}")
            rates[name].append(float(re.findall(r"([\d,]+) samples/s", done.stdout)[-1].replace(",", "")))
    for name, values in rates.items():
        print(f"{name:<20} median {statistics.median(values):>10,.0f}  "
              f"[{min(values):,.0f} - {max(values):,.0f}]")


if __name__ == "__main__":
    main()
