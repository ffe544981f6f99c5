import sys

from latentedit.cli import main

sys.exit(main())
