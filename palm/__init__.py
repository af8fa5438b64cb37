"""palm-rlhf: from raw web pages to a chat model aligned with human feedback.

The library. Stages (``stages/``) are thin command lines over it; nothing here reads
``params.yaml`` or global state: configs and process groups are passed in.
"""

__version__ = "0.1.0"
