from virtdp_serve.cli import main

raise SystemExit(main())
