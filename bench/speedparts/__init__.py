"""The parts of ``bench/speed.py``, one module per part (encoder, int8, decoder, e2e, triton, finetune), plus
``common`` (timing, images, child processes) and ``report`` (the markdown summary).

``bench/speed.py`` is the only entry point: it parses the command line, runs the parts asked for, merges their
results into ``speed.json`` and renders ``speed.md``. Variants that need their own process (an allocator chosen
with LD_PRELOAD, a server) re-run ``bench/speed.py --child <kind> ...``, which dispatches to a ``child_*``
function here. Modules import only the standard library and numpy at import time; torch, sam_core and the
services are imported inside the functions that use them, so a child pays only for what it runs.
"""
