from kmsnet.cli import main

raise SystemExit(main())
