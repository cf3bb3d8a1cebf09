import sys

from skr8tr.cli import main

sys.exit(main())
