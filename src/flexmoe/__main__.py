"""``python -m flexmoe``: the ``flexmoe`` command (``flexmoe.cli.main``)."""

import sys

from flexmoe.cli import main

if __name__ == "__main__":
    sys.exit(main())
