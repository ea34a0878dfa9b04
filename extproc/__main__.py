from extproc.cli.main import main

raise SystemExit(main())
