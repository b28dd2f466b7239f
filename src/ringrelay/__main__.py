from ringrelay.cli import main

raise SystemExit(main())
