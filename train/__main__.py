"""`python -m train pretrain|finetune CONFIG [key=value ...]`: the entry point for torchrun, accelerate and deepspeed."""

import sys

from train.cli import main

sys.exit(main())
