import sys

from lorapipe.cli import main

sys.exit(main())
