import sys

from cfdg.cli import main

sys.exit(main())
