"""`python -m sidpipe.bench.accuracy ...`: the same as `sidpipe accuracy ...`."""

import sys

from sidpipe.bench.accuracy import main

sys.exit(main())
