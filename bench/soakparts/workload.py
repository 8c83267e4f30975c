"""One soak session over gRPC, and the locust user that repeats it.

A session (``run_session``) is what an annotation client does with a new image: ``Embed`` it (encoder), then
the Segment calls of its ``SessionPlan`` by embedding key (decoder; RLE masks), then maybe a
``SegmentEverything`` on a grid of ``Load.everything_points`` per side (the service's default, 16 = 256
prompts, takes tens of seconds on a 2-core CPU; the soak's default is 8). Every call has a deadline of
``Load.deadline_s`` and is reported to a ``Recorder`` as (RPC name, milliseconds, response bytes, gRPC status
code name or None); a failed Embed ends the session. ``user_class(load)`` is a locust ``User`` whose one task
is a session on the next image number (shared counter, so no two users send the same image); its recorder
fires locust's ``request`` event with request_type ``grpc``, the RPC name, and the status code name as the
error, so locust's stats hold latency per RPC and failures per (RPC, code).

``EXPECTED_CODES`` are the codes a correct service may answer under this load: RESOURCE_EXHAUSTED is the
encoder's designed refusal when its queue cannot meet a deadline (load shedding). Every other code is an
unexpected error of the soak.

gRPC under gevent: ``bench/soak.py`` imports locust (which monkey-patches the standard library) and calls
``grpc.experimental.gevent.init_gevent()`` before any channel exists; blocking stubs then yield to other
users while waiting.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench.soakparts.images import ImageSource, PromptSpec, SessionPlan, session_plan

if TYPE_CHECKING:
    from locust import User

    from services._generated.sam.v1 import decoder_pb2

EXPECTED_CODES = frozenset({"RESOURCE_EXHAUSTED"})
RPCS = ("Embed", "Segment", "SegmentEverything")
Recorder = Callable[[str, float, int, "str | None"], None]


@dataclass
class Load:
    """What every user shares: service addresses, the image source and the next image number, the mix."""

    encoder: str
    decoder: str
    images: ImageSource
    seed: int
    deadline_s: float = 60.0
    think_s: float = 1.0
    max_prompts: int = 4
    everything_probability: float = 0.1
    everything_points: int = 8
    numbers: Iterator[int] = field(default_factory=itertools.count)
    in_flight: int = 0
    max_in_flight: int = 0


class Stubs:
    """One client's channels (its own, as separate clients have) and the encoder and decoder stubs."""

    def __init__(self, encoder: str, decoder: str) -> None:
        import grpc

        from services._generated.sam.v1 import decoder_pb2_grpc, encoder_pb2_grpc

        self.channels = [grpc.insecure_channel(encoder), grpc.insecure_channel(decoder)]
        self.encoder = encoder_pb2_grpc.EncoderServiceStub(self.channels[0])
        self.decoder = decoder_pb2_grpc.DecoderServiceStub(self.channels[1])

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def timed_call(record: Recorder, name: str, method: Callable[..., Any], request: Any, load: Load) -> Any:
    """Call ``method(request)`` with ``load``'s deadline and report it to ``record``; the response, or None when
    it failed. ``load.max_in_flight`` keeps the most calls in flight at once (users are greenlets of one thread,
    so the counter needs no lock; above 1 it shows the blocking stubs yield under gevent)."""
    import grpc

    t0 = time.perf_counter()
    load.in_flight += 1
    load.max_in_flight = max(load.max_in_flight, load.in_flight)
    try:
        response = method(request, timeout=load.deadline_s)
    except grpc.RpcError as err:
        code = err.code() if callable(getattr(err, "code", None)) else None
        record(name, 1e3 * (time.perf_counter() - t0), 0, code.name if code is not None else "UNKNOWN")
        return None
    finally:
        load.in_flight -= 1
    record(name, 1e3 * (time.perf_counter() - t0), response.ByteSize(), None)
    return response


def prompt_message(spec: PromptSpec) -> decoder_pb2.Prompt:
    """The wire form of a ``PromptSpec``."""
    from services._generated.sam.v1 import decoder_pb2

    prompt = decoder_pb2.Prompt(points=[decoder_pb2.Point(x=x, y=y, label=label) for x, y, label in spec.points])
    if spec.box is not None:
        x0, y0, x1, y1 = spec.box
        prompt.box.CopyFrom(decoder_pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1))
    return prompt


def run_session(stubs: Stubs, image: bytes, plan: SessionPlan, record: Recorder, load: Load,
                stopping: Callable[[], bool] = lambda: False) -> None:
    """Embed ``image``, then the plan's Segment calls and maybe SegmentEverything by its key; ``stopping()``
    is checked between calls so a stopping user ends after the call in flight."""
    from services._generated.sam.v1 import decoder_pb2, encoder_pb2

    embedded = timed_call(record, "Embed", stubs.encoder.Embed, encoder_pb2.EmbedRequest(image=image), load)
    if embedded is None:
        return
    key = embedded.embedding.key
    for prompts in plan.segments:
        if stopping():
            return
        request = decoder_pb2.SegmentRequest(embedding_key=key, prompts=[prompt_message(p) for p in prompts],
                                             encoding=decoder_pb2.MASK_ENCODING_RLE)
        timed_call(record, "Segment", stubs.decoder.Segment, request, load)
    if plan.everything and not stopping():
        request_all = decoder_pb2.SegmentEverythingRequest(embedding_key=key, points_per_side=load.everything_points,
                                                           encoding=decoder_pb2.MASK_ENCODING_RLE)
        timed_call(record, "SegmentEverything", stubs.decoder.SegmentEverything, request_all, load)


def next_session(load: Load) -> tuple[bytes, SessionPlan]:
    """The next image number's JPEG bytes and its plan."""
    index = next(load.numbers)
    image, height, width = load.images.encoded(index)
    return image, session_plan(load.seed, index, height, width, max_prompts=load.max_prompts,
                               everything_probability=load.everything_probability)


def user_class(load: Load) -> type[User]:
    """A locust ``User`` running sessions against ``load``'s services, think time uniform in [0, think_s]."""
    from locust import User, between, task
    from locust.user.task import LOCUST_STATE_STOPPING

    class SoakUser(User):
        wait_time = between(0, load.think_s)

        def on_start(self) -> None:
            self.stubs = Stubs(load.encoder, load.decoder)

        def on_stop(self) -> None:
            self.stubs.close()

        def record(self, name: str, ms: float, length: int, code: str | None) -> None:
            self.environment.events.request.fire(request_type="grpc", name=name, response_time=ms,
                                                 response_length=length, exception=code, context={})

        @task
        def session(self) -> None:
            image, plan = next_session(load)
            run_session(self.stubs, image, plan, self.record, load,
                        stopping=lambda: self._state == LOCUST_STATE_STOPPING)

    return SoakUser
