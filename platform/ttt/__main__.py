import sys

from ttt.cli import main

sys.exit(main())
