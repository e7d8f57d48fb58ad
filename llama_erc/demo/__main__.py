"""`python -m llama_erc.demo`: the main job on the embedded default (demo/smollm2.py)."""
from llama_erc.demo.smollm2 import main

raise SystemExit(main())
