"""The parts of ``bench/soak.py``: ``images`` (distinct images and the prompts of each session), ``workload``
(one session of RPCs, the locust user that repeats it), ``memory`` (RSS of the service processes, the memory
budget each service reports, the plateau verdict) and ``report`` (machine facts, the JSON result, the markdown
summary).

``bench/soak.py`` is the only entry point. Modules import only the standard library and numpy at import time;
gRPC, locust and cv2 are imported inside the functions that use them, so that ``bench/soak.py`` can let locust
monkey-patch the standard library (gevent) before any gRPC object exists, and so that the pure parts (plateau
verdict, budgets, report) are importable by tests without either.
"""
