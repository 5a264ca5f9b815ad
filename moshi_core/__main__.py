import sys

from moshi_core.cli.main import main

sys.exit(main())
