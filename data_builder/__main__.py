"""`python -m data_builder --config FILE [key=value ...]`: the same as `persllm build-data`."""

import sys

from persllm_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-data", *sys.argv[1:]]))
