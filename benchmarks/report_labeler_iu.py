"""The report labeler against the IU X-ray MeSH major tags: per-label precision / recall / F1 on all 3,955 reports.

``medfm.evaluate.report_labeler`` labels each report's findings + impression text; the reference is the
report's MeSH major tags mapped to the same labels (``medfm.data.reports.IU_LABELS``). Both uncertainty
policies are shown: uncertain mentions counted positive (U-ones) or negative (U-zeros).

    python benchmarks/report_labeler_iu.py
"""

from __future__ import annotations

import time

import numpy as np

from medfm.data.reports import read_iu_xray
from medfm.evaluate.report_labeler import LABELS, agreement, label_reports


def main() -> None:
    t0 = time.perf_counter()
    reports = read_iu_xray()
    texts, target = [r.text() for r in reports], np.stack([r.labels for r in reports])
    res = {u: agreement(label_reports(texts, u), target) for u in ("positive", "negative")}
    print(f"{len(reports)} IU X-ray reports, {time.perf_counter() - t0:.1f} s\n")
    print("| label | MeSH positives | P (U-ones) | R (U-ones) | F1 (U-ones) | P (U-zeros) | R (U-zeros) | F1 (U-zeros) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in LABELS:
        a, b = res["positive"]["per_label"][name], res["negative"]["per_label"][name]
        print(f"| {name} | {a['support']} | {a['precision']:.3f} | {a['recall']:.3f} | {a['f1']:.3f} | "
              f"{b['precision']:.3f} | {b['recall']:.3f} | {b['f1']:.3f} |")
    for avg in ("micro", "macro"):
        a, b = res["positive"][avg], res["negative"][avg]
        print(f"| **{avg}** | | {a['precision']:.3f} | {a['recall']:.3f} | {a['f1']:.3f} | "
              f"{b['precision']:.3f} | {b['recall']:.3f} | {b['f1']:.3f} |")


if __name__ == "__main__":
    main()
