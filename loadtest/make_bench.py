"""`make bench`: serve the embedded model on this machine, load it with bench_serving and locust, measure its
accuracy with bench_accuracy, record.

    python loadtest/make_bench.py                 # a few minutes: bench_serving, a 30 s locust run, accuracy
    python loadtest/make_bench.py --soak 600      # plus a 10-minute soak at a fixed rate

It starts `python -m baleen.launch_server` on a free port, waits for /health, runs the two load tools as
subprocesses (locust must never share a process with anything else: it monkey-patches sockets), stops the
server with SIGTERM (which must exit 0); then serves the model again with the R1 template and parsers and runs
bench_accuracy.py (--accuracy-num questions per family, 0 skips it). The tables go into docs/PERF.md between
markers, with the machine described. Raw outputs go to loadtest/results/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "loadtest" / "results"
START, END = "<!-- make-bench:start -->", "<!-- make-bench:end -->"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> str:
    cpu = "unknown CPU"
    info = Path("/proc/cpuinfo")
    if info.exists():
        m = re.search(r"model name\s*:\s*(.+)", info.read_text())
        cpu = m.group(1).strip() if m else cpu
    mem = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        m = re.search(r"MemTotal:\s+(\d+)", meminfo.read_text())
        mem = f", {int(m.group(1)) / 2**20:.0f} GiB" if m else ""
    return f"{os.cpu_count()} cores ({cpu}){mem}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode} before it was healthy")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not healthy after {timeout:.0f} s")


def run(cmd: list[str], log: Path) -> None:
    print("+", " ".join(cmd), flush=True)
    with log.open("w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    print(log.read_text()[-3000:])
    if code != 0:
        raise SystemExit(f"{cmd[1] if len(cmd) > 1 else cmd[0]} failed with exit code {code} (log: {log})")


def locust_rows(stats_csv: Path) -> list[dict[str, str]]:
    with stats_csv.open() as f:
        return [r for r in csv.DictReader(f) if r["Name"] != "Aggregated" or r["Type"] == ""]


def bench_table(summary: dict) -> list[str]:
    lines = [
        f"requests {summary['completed']} ok / {summary['failed']} failed in {summary['duration_s']:.1f} s; "
        f"{summary['request_throughput']:.2f} req/s, output {summary['output_throughput']:.1f} tok/s, "
        f"input {summary['input_throughput']:.1f} tok/s",
        "",
        "| latency (ms) | mean | median | p90 | p99 |",
        "|---|---|---|---|---|",
    ]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = summary[key]
        lines.append(f"| {key[:-3].upper()} | {s['mean']:.1f} | {s['median']:.1f} | {s['p90']:.1f} | {s['p99']:.1f} |")
    return lines


def write_perf(section: list[str]) -> None:
    perf = ROOT / "docs" / "PERF.md"
    text = perf.read_text() if perf.exists() else "# Measured performance\n"
    block = "\n".join([START, *section, END])
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    perf.write_text(text)


ACCURACY_FLAGS = ("--chat-template", "deepseek-r1", "--reasoning-parser", "deepseek-r1", "--tool-call-parser",
                  "deepseekv3")


def measure_accuracy(num: int) -> str:
    """Serve the model as bench_accuracy expects it, run it, return its table (raw JSON in loadtest/results/)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (RESULTS / "server_accuracy.log").open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "baleen.launch_server", "--port", str(port), *ACCURACY_FLAGS],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_healthy(url, server, timeout=600)
            run([sys.executable, "loadtest/bench_accuracy.py", "--base-url", f"{url}/v1", "--num", str(num),
                 "--json", str(RESULTS / "accuracy.json")], RESULTS / "accuracy.log")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    text = (RESULTS / "accuracy.log").read_text()
    return "\n".join(line for line in text.splitlines() if line.startswith("|"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=4, help="locust users and bench_serving concurrency")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--locust-seconds", type=int, default=30)
    ap.add_argument("--soak", type=int, default=0, help="also soak this many seconds (issue 6: 600)")
    ap.add_argument("--soak-rate", type=float, default=1.0, help="requests/s during the soak")
    ap.add_argument("--server-args", default="", help="extra flags for the server")
    ap.add_argument("--no-write", action="store_true", help="do not touch docs/PERF.md")
    ap.add_argument("--accuracy-num", type=int, default=20, help="bench_accuracy questions per family (0: skip)")
    args = ap.parse_args()

    RESULTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_cmd = [sys.executable, "-m", "baleen.launch_server", "--port", str(port), *args.server_args.split()]
    print("+", " ".join(server_cmd), flush=True)
    server_log = (RESULTS / "server.log").open("w")
    server = subprocess.Popen(server_cmd, stdout=server_log, stderr=subprocess.STDOUT, cwd=ROOT)
    py = sys.executable
    try:
        wait_healthy(url, server, timeout=600)
        common = ["--base-url", url, "--dataset-name", "random", "--random-input-len", str(args.input_len),
                  "--random-output-len", str(args.output_len), "--random-range-ratio", "1.0"]
        run([py, "loadtest/bench_serving.py", *common, "--num-prompts", str(args.num_prompts),
             "--max-concurrency", str(args.users), "--output-file", str(RESULTS / "bench_serving.json"),
             "--plot", str(RESULTS / "bench_serving.png")], RESULTS / "bench_serving.log")
        locust = [py, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "-u", str(args.users),
                  "-r", str(args.users), "-t", f"{args.locust_seconds}s", "--host", url, "--only-summary",
                  "--csv", str(RESULTS / "locust"), "--prompt-len", str(args.input_len),
                  "--output-len", str(args.output_len)]
        run(locust, RESULTS / "locust.log")
        soak = None
        if args.soak:
            run([py, "loadtest/bench_serving.py", *common, "--num-prompts", "200", "--request-rate",
                 str(args.soak_rate), "--soak-seconds", str(args.soak), "--watch-pid", str(server.pid),
                 "--metrics-url", url + "/metrics", "--output-file", str(RESULTS / "soak.json")],
                RESULTS / "soak.log")
            soak = json.loads((RESULTS / "soak.json").read_text())["soak"]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = -9
    if code != 0:
        raise SystemExit(f"the server exited with code {code} after SIGTERM (log: {RESULTS / 'server.log'})")
    accuracy = measure_accuracy(args.accuracy_num) if args.accuracy_num else None

    summary = json.loads((RESULTS / "bench_serving.json").read_text())["summary"]
    section = [
        f"## `make bench`: the embedded trained model on CPU — {date.today().isoformat()}",
        f"Machine: {machine()}. Server: `python -m baleen.launch_server {args.server_args}` (defaults).",
        "",
        f"### bench_serving: random {args.input_len} in / {args.output_len} out, {args.num_prompts} prompts, "
        f"concurrency {args.users}",
        *bench_table(summary),
        "",
        f"### locust: {args.users} users, {args.locust_seconds} s, headless",
        "| type | name | requests | failures | median ms | avg ms | p90 ms | p99 ms | req/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in locust_rows(RESULTS / "locust_stats.csv"):
        section.append(
            f"| {r['Type']} | {r['Name']} | {r['Request Count']} | {r['Failure Count']} | {r['Median Response Time']} | "
            f"{float(r['Average Response Time']):.1f} | {r['90%']} | {r['99%']} | {float(r['Requests/s']):.2f} |"
        )
    if soak is not None:
        start, end = soak["rss_start"]["total_kb"] / 1024, soak["rss_end"]["total_kb"] / 1024
        section += [
            "",
            f"### soak: {soak['seconds']:.0f} s at {soak['request_rate']} req/s",
            f"{soak['requests']} requests, {soak['failed']} failed; RSS of the server and its children "
            f"{start:.0f} -> {end:.0f} MiB (peak {soak['rss_peak_kb'] / 1024:.0f}); {soak['gauge']} "
            f"{soak['gauge_start']} at start -> {soak['gauge_end']} when idle.",
        ]
    if accuracy is not None:
        section += ["", f"### bench_accuracy: {args.accuracy_num} held-out questions per family, greedy "
                    f"(`{' '.join(ACCURACY_FLAGS)}`)", accuracy]
    print("\n".join(section))
    if not args.no_write:
        write_perf(section)


if __name__ == "__main__":
    main()
