"""Run every benchmark and write bench/RESULTS.md (used by `make bench`).

Each benchmark measures its two contenders side by side in one run and prints a markdown table and a
ratio; this script adds the machine and collects them. Pass --quick for smaller sizes.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHES = {
    "extract": ("Extraction vs a bare timm loop", ["extract.py"], ["extract.py", "--images", "64", "--repeats", "1"]),
    "train": ("Head training from the cache vs backbone per batch; FAISS vs scikit-learn k-means",
              ["train.py"], ["train.py", "--images-per-class", "16", "--repeats", "1"]),
    "stage_b": ("A stage B training step: the paper's layout vs codes-last vs per-block projection", ["stage_b.py"],
                ["stage_b.py", "--steps", "2", "--repeats", "1"]),
    "autocast": ("Extraction autocast: float16 vs bfloat16 against float32, real weights", ["autocast.py", "--images", "24"],
                 ["autocast.py", "--images", "8"]),
    "cache_read": ("Reading the cache vs a numpy memmap", ["cache_read.py"], ["cache_read.py", "--images", "1024"]),
    "scale": ("Streaming a cache larger than the RAM budget (bench/scale.py)", ["scale.py"],
              ["scale.py", "--sizes", "4096,16384", "--grid", "4", "--dim", "256", "--max-memory", "8MB", "--k", "4"]),
    "sweep": ("Many heads per pass: protoquant sweep vs separate train commands", ["sweep.py"],
              ["sweep.py", "--train", "1000", "--test", "300", "--epochs", "3"]),
}


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}; "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (minutes instead of tens of minutes)")
    parser.add_argument("--only", nargs="*", choices=list(BENCHES), help="run only these")
    args = parser.parse_args()
    sections = [f"# Benchmark results\n\nMachine: {machine()}\n\nCPU speed on shared machines swings by up to 3x "
                "from minute to minute: compare the ratios, each measured side by side in one run.\n"]
    for name, (title, full, quick) in BENCHES.items():
        if args.only and name not in args.only:
            continue
        command = [sys.executable, str(HERE / (quick if args.quick else full)[0]), *(quick if args.quick else full)[1:]]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        begin = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
        output = result.stdout.strip() if result.returncode == 0 else f"FAILED (exit {result.returncode}):\n{result.stderr[-2000:]}"
        print(output, flush=True)
        sections.append(f"## {title}\n\n`python bench/{' '.join(command[1:])}` ({time.perf_counter() - begin:.0f} s)\n\n{output}\n")
    (HERE / "RESULTS.md").write_text("\n".join(sections))
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
