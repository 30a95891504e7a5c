import sys

from deltazip.cli import main

sys.exit(main())
