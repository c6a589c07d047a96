import sys

from vmoe.bench.harness import main

sys.exit(main())
