"""EncoderService.Stats over real gRPC (tiny model): scoped to the caller's tenant. Another tenant's cache
entries, bytes, hits, misses, encodes and loaded adapters are invisible; capacity figures stay global."""

from __future__ import annotations

import json

import grpc
import pytest

from sam_core.adapters.filesystem import FileSystemAdapterStore
from services._generated.sam.v1 import common_pb2, encoder_pb2
from tests.conftest import save_perturbed_adapter
from tests.integration.test_encoder_service import encoder_env, noise_png, started, stub_for

pytestmark = pytest.mark.integration
AS_A = (("authorization", "Bearer token-a"),)
AS_B = (("authorization", "Bearer token-b"),)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory, tiny_model):
    """A tiny encoder without auth and one with tokens for tenants a and b; tenant a has a LoRA adapter."""
    plain, auth = (tmp_path_factory.mktemp(name) for name in ("stats-plain", "stats-auth"))
    tokens = auth / "tokens.json"
    tokens.write_text(json.dumps({"token-a": "a", "token-b": "b"}))
    for workdir in (plain, auth):
        adapter = save_perturbed_adapter(tiny_model, "lora", workdir / "lora-artifact")
        FileSystemAdapterStore(workdir / "registry").publish("a", "mine", adapter)
    with started(("encoder", encoder_env(plain), plain),
                 ("encoder", encoder_env(auth, SAMFORGE_AUTH_TOKENS_FILE=str(tokens)), auth)) as services:
        yield services


def _embed_twice_as_a(stub, tenant: str = "", metadata: tuple[tuple[str, str], ...] = AS_A) -> None:
    """One image with the base model and with tenant a's adapter, each twice (2 encodes, 2 misses, 2 hits)."""
    for adapter in ("", "mine"):
        request = encoder_pb2.EmbedRequest(image=noise_png(11), tenant=tenant,
                                           adapter=common_pb2.AdapterRef(ref=adapter))
        first = stub.Embed(request, metadata=metadata, timeout=60)
        again = stub.Embed(request, metadata=metadata, timeout=60)
        assert not first.cached and again.cached


def _assert_sees_nothing(stats: encoder_pb2.StatsResponse) -> None:
    assert (stats.cache_entries, stats.cache_bytes, stats.hits, stats.misses, stats.evictions, stats.encodes,
            stats.l2_hits) == (0, 0, 0, 0, 0, 0, 0), stats
    assert list(stats.loaded_adapters) == []


def _assert_sees_its_own(stats: encoder_pb2.StatsResponse) -> None:
    assert stats.cache_entries == 2 and stats.cache_bytes > 0 and stats.encodes == 2, stats
    assert stats.hits == 2 and stats.misses == 2
    assert list(stats.loaded_adapters) == ["a/mine:1"]


def test_stats_with_tokens_show_only_the_callers_tenant(encoders):
    channel, stub = stub_for(encoders[1].address)
    with channel:
        _embed_twice_as_a(stub)
        of_b = stub.Stats(encoder_pb2.StatsRequest(), metadata=AS_B, timeout=10)
        of_a = stub.Stats(encoder_pb2.StatsRequest(), metadata=AS_A, timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            stub.Stats(encoder_pb2.StatsRequest(tenant="a"), metadata=AS_B, timeout=10)
    _assert_sees_nothing(of_b)
    _assert_sees_its_own(of_a)
    assert of_b.cache_budget_bytes == of_a.cache_budget_bytes > 0 and of_b.model_id == of_a.model_id
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_stats_without_auth_are_scoped_by_the_requested_tenant(encoders):
    channel, stub = stub_for(encoders[0].address)
    with channel:
        _embed_twice_as_a(stub, tenant="a", metadata=())
        _assert_sees_nothing(stub.Stats(encoder_pb2.StatsRequest(tenant="b"), timeout=10))
        _assert_sees_nothing(stub.Stats(encoder_pb2.StatsRequest(), timeout=10))  # the "default" tenant
        _assert_sees_its_own(stub.Stats(encoder_pb2.StatsRequest(tenant="a"), timeout=10))
