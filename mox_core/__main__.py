import sys

from mox_core.cli import main

sys.exit(main())
