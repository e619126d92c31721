"""Experiment, not a product setting: meshaudit with CPython's full (generation 2) collections
deferred. Under load the bounded stores hold ~10^6 tracked objects, and each full collection
walks them all on the event loop; ``python -m bench.run --gc-tuned`` measures the difference.
"""

from __future__ import annotations

import gc
import sys

from meshaudit.cli import main

if __name__ == "__main__":
    gc.freeze()  # start-up objects (config, policy, modules) never need scanning again
    gc.set_threshold(700, 10, 1_000_000)  # young collections as usual; full ones practically never
    sys.exit(main())
