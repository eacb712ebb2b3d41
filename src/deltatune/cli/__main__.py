import sys

from deltatune.cli import main

sys.exit(main())
