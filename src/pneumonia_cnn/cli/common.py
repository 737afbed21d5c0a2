"""What every command family shares: the command record, logging, JSON printing, common options."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One sub-command: its name, one-line help, the options it takes, what it runs, and examples."""
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    examples: tuple[str, ...] = ()


def setup_logging(verbose: bool):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("matplotlib", "PIL", "urllib3", "httpx", "h5py", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print_json(payload):
    print(json.dumps(payload, indent=2, default=str))


def add_device(parser, default: str = "auto"):
    parser.add_argument("--device", default=default, help="auto (CUDA when available), cpu, cuda or cuda:N")


def add_format(parser, choices=("table", "json"), default: str = "table"):
    parser.add_argument("--format", choices=choices, default=default, help="output format")


def add_cache_dir(parser):
    parser.add_argument("--cache-dir", help="where decoded arrays are cached (default: ~/.cache/pneumonia-cnn)")


def add_engine(parser):
    parser.add_argument("--engine", choices=("auto", "torch", "onnx", "onnx-int8", "openvino-int8"), default="auto",
                        help="auto: ONNX Runtime on CPUs in float32, else torch; "
                             "onnx-int8: the int8 graph built by export --format onnx-int8 (its output says int8); "
                             "openvino-int8: the same graph run by OpenVINO (pip install 'pneumonia-cnn[openvino]')")


def add_site_options(parser):
    """A site's batch: prevalence and batch-norm adaptation (see the README's "Decision" section)."""
    parser.add_argument("--prevalence", metavar="RATE|estimate",
                        help="state probabilities for this pneumonia rate (e.g. 0.3), or 'estimate' it from the "
                             "images scored together (EM); operating-point thresholds move with it")
    parser.add_argument("--adapt-batch", action="store_true",
                        help="re-estimate batch-norm statistics on the in-distribution images scored together "
                             "(AdaBN; needs one site's batch of at least 32 images)")
