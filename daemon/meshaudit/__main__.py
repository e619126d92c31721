import sys

from meshaudit.cli import main

sys.exit(main())
