"""``python -m taurl``: the ``taurl`` command (``torchrun --nproc-per-node N -m taurl train ...``).

The guard matters: vLLM and torch.multiprocessing start children that import the
main module again.
"""

import sys

from taurl.cli import main

if __name__ == "__main__":
    sys.exit(main())
