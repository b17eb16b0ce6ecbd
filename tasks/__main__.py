"""``python -m tasks`` is the ``tinykd`` command."""
import sys

from tasks.cli import main

sys.exit(main())
