from __future__ import annotations

from extproc.simulator import main

raise SystemExit(main())
