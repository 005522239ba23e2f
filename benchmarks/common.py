"""What every benchmark script shares: the device in words, the exact command, peak memory,
markdown tables, and appending one section per run to benchmarks/RESULTS.md (or `--results`).

Scripts run as ``python benchmarks/<name>.py`` and import this as ``common`` (their folder is
first on `sys.path`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shlex
import sys
from typing import Sequence

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def add_results_option(parser: argparse.ArgumentParser) -> None:
    """`--results PATH`: where the section is appended (tests point it at a temp file)."""
    parser.add_argument("--results", default=RESULTS, help="markdown file the run's section is appended to")


def device_description(device: torch.device | str = "cpu") -> str:
    """ "NVIDIA H100 80GB HBM3, CUDA 12.x, torch 2.x" or "<CPU model> (x86_64, bf16: AMX), 2 cores, torch 2.x, 2 threads"."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} thread{'s' if threads > 1 else ''}"


def cpu_model() -> str:
    """The CPU's model name and its native bf16 support (where bf16 rows stand against fp32 rows
    depends on it): "AMD EPYC 7B13 (x86_64, bf16: emulated)", "Intel(R) Xeon(R) ... (bf16: AMX)"."""
    name, flags = "", set[str]()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    bf16 = "AMX" if "amx_bf16" in flags else "AVX-512" if "avx512_bf16" in flags else "emulated"
    arch = platform.machine()
    return f"{name or arch + ' CPU'} ({arch}, bf16: {bf16 if flags else 'unknown'})"


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, relative to the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = os.path.relpath(
        os.path.abspath(argv[0]), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )
    return shlex.join(["python", script, *argv[1:]])


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak memory of this process: the CUDA allocator's max allocated bytes on a GPU, else the
    process's resident-set high-water mark (Linux reports KiB)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A GitHub markdown table; `align` holds one "l" or "r" per column (default: first left,
    the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def append_section(
    path: str, title: str, device: str, notes: Sequence[str], body: str, command: str | None = None
) -> str:
    """Append "## title (date UTC)", the device, the exact command, notes and `body` to `path`;
    returns the section's text."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    lines = [
        f"## {title} ({stamp} UTC)",
        "",
        f"- device: {device}",
        f"- command: `{command or command_line()}`",
    ]
    lines += [f"- {note}" for note in notes]
    text = "\n".join(lines) + "\n\n" + body.rstrip("\n") + "\n"
    with open(path, "a") as f:
        f.write("\n" + text)
    return text
