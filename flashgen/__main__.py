from flashgen.engine.cli import main

raise SystemExit(main())
