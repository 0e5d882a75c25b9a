import sys

from watchfolder.cli import main

sys.exit(main())
