"""``python -m jax_tilek COMMAND``: see :mod:`jax_tilek._cli`."""

import sys

from jax_tilek._cli import main

if __name__ == "__main__":
    sys.exit(main())
