"""Entry point of `python -m fusedres.bench` and the `fusedres-bench` console script."""
import sys

from fusedres.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
