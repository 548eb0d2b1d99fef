"""`python -m traintrain.bench …`."""

import sys

from traintrain.bench import main

sys.exit(main())
