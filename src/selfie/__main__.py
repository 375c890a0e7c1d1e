import sys

from selfie.cli import main

sys.exit(main())
