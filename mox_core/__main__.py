import sys

from mox_core.cli.main import main

sys.exit(main())
