from imgprep.cli import main

raise SystemExit(main())
