"""The run side: torch, accelerate, diffusers, lycoris. Imported only to train."""

import logging

# bitsandbytes (pulled in by lycoris) warns at import about optional 4-bit CPU
# kernels that LoRA training never uses; keep that noise out of users' logs.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
