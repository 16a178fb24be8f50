"""``python -m keras_psm_cli``: the ``keras-psm`` command."""

import sys

from keras_psm_cli import main

if __name__ == "__main__":
    sys.exit(main())
