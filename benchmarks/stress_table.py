"""Markdown table of several stress results side by side:
python benchmarks/stress_table.py "tutorial=runs/tutorial/stress.json" "best=runs/best/stress.json"
"""
from __future__ import annotations

import json
import sys


def main():
    runs = []
    for argument in sys.argv[1:]:
        label, _, path = argument.partition("=")
        runs.append((label, json.loads(open(path).read())))
    header = "| shift | " + " | ".join(f"{label}: AUC / sens / spec" for label, _ in runs) + " |"
    print(header)
    print("|---|" + "---|" * len(runs))

    def cells(row):
        return f"{row['roc_auc']:.3f} / {row['sensitivity']:.3f} / {row['specificity']:.3f}"
    print("| none | " + " | ".join(cells(result["baseline"]) for _, result in runs) + " |")
    for index, shift in enumerate(runs[0][1]["shifts"]):
        print(f"| {shift['shift']} | " + " | ".join(cells(result["shifts"][index]) for _, result in runs) + " |")
    print("| **worst AUC; largest sensitivity / specificity drop** | " + " | ".join(
        f"**{result['worst_roc_auc']['roc_auc']:.3f}**; {result['largest_sensitivity_drop']:+.3f} / "
        f"{result['largest_specificity_drop']:+.3f}" for _, result in runs) + " |")


if __name__ == "__main__":
    main()
