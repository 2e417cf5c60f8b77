"""Everything the scripts share, one file per concept."""

import logging

# bitsandbytes warns on import about an optional CPU kernel package; only --use_8bit_adam uses it, on GPUs.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
