from pipegate.cli import main

raise SystemExit(main())
