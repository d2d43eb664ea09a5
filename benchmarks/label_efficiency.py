"""Label efficiency on real data: every encoder init against random init with K labelled examples per class.

The harness is ``medfm benchmark`` (:mod:`medfm.benchmark`); this script is the same command, kept beside
the other benchmarks. Measured numbers: ``benchmarks/RESULTS.md``, "Label efficiency".

    python benchmarks/label_efficiency.py --data pneumonia=../shared/data/pneumoniamnist/pneumoniamnist_trainval.npz \\
        --data medpix=../shared/data/medpix2/manifest.csv --pretrain-budget 500 --out runs/label_efficiency
"""

import sys

from medfm.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
