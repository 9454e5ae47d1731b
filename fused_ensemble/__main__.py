"""``python -m fused_ensemble {bench,train,export,predict} ...`` (also installed as ``fused-ensemble``)."""

import sys

from fused_ensemble.cli import main

if __name__ == "__main__":
    sys.exit(main())
