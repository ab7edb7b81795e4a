import sys

from lora_scaffold.cli import main


sys.exit(main())
