"""Cross-tenant isolation with auth on: tenant bravo's token cannot read or change what tenant acme owns (embedding
keys, adapters, jobs, uploads). Another tenant's object is NOT_FOUND exactly like a missing one, and no message
carries acme's name or data; naming acme explicitly is PERMISSION_DENIED. (Encoder-only key isolation and
Segment by key are also in tests/integration; metrics / Stats scoping is tested with its fix.)"""

from __future__ import annotations

import grpc
import pytest

from services._generated.sam.v1 import common_pb2, decoder_pb2, encoder_pb2, trainer_pb2
from tests.reliability.corpus import IMAGE
from tests.reliability.harness import AS_B, SERVING, call, health

pytestmark = pytest.mark.integration
Code = grpc.StatusCode


def _box() -> list[decoder_pb2.Prompt]:
    return [decoder_pb2.Prompt(box=decoder_pb2.Box(x0=2, y0=2, x1=30, y1=30))]


def cases(owned):
    """(what, rpc, request as tenant bravo) -> NOT_FOUND: acme's objects, addressed by name, key or id."""
    return [
        ("embedding key", "GetEmbedding", encoder_pb2.GetEmbeddingRequest(key=owned.key)),
        ("segment by key", "Segment", decoder_pb2.SegmentRequest(embedding_key=owned.key, prompts=_box())),
        ("everything by key", "SegmentEverything",
         decoder_pb2.SegmentEverythingRequest(embedding_key=owned.key, points_per_side=2)),
        ("adapter", "GetAdapter", trainer_pb2.GetAdapterRequest(ref="ships@prod")),
        ("adapter version", "GetAdapter", trainer_pb2.GetAdapterRequest(ref="ships:1")),
        ("adapter in Segment", "Segment", decoder_pb2.SegmentRequest(image=IMAGE, prompts=_box(),
                                                                     adapter=common_pb2.AdapterRef(ref="ships"))),
        ("adapter in Embed", "Embed",
         encoder_pb2.EmbedRequest(image=IMAGE, adapter=common_pb2.AdapterRef(ref="ships"))),
        ("promote", "Promote", trainer_pb2.PromoteRequest(name="ships", alias="prod", version=1)),
        ("rollback", "Rollback", trainer_pb2.RollbackRequest(name="ships", alias="prod")),
        ("delete", "Delete", trainer_pb2.DeleteRequest(name="ships", version=1)),
        ("watch job", "WatchJob", trainer_pb2.WatchJobRequest(id=owned.job_id)),
        ("cancel job", "CancelJob", trainer_pb2.CancelJobRequest(id=owned.job_id)),
        ("job on the upload", "CreateJob", trainer_pb2.CreateJobRequest(dataset=owned.upload_id, method="decoder",
                                                                         adapter_name="stolen")),
        ("job on the data folder", "CreateJob", trainer_pb2.CreateJobRequest(dataset="empty", method="decoder",
                                                                              adapter_name="stolen")),
    ]


def test_another_tenants_objects_are_not_found_and_nothing_leaks(clients, owned, reliability_stack):
    for what, rpc, request in cases(owned):
        outcome = call(clients.method(rpc), request, metadata=AS_B)
        assert outcome.code == Code.NOT_FOUND, (what, outcome.code, outcome.details)
        assert "acme" not in outcome.details and str(reliability_stack.root) not in outcome.details, (what, outcome)
    assert not call(clients.trainer.ListJobs, trainer_pb2.ListJobsRequest(), metadata=AS_B).reply.jobs
    assert not call(clients.registry.ListAdapters, trainer_pb2.ListAdaptersRequest(), metadata=AS_B).reply.adapters
    for address in reliability_stack.addresses.values():
        assert health(address) == SERVING


def test_acme_still_has_everything_bravo_tried_to_touch(clients, owned):
    prod = call(clients.registry.GetAdapter, trainer_pb2.GetAdapterRequest(ref="ships@prod")).reply
    assert prod.version == 2 and prod.tenant == "acme"
    listed = call(clients.registry.ListAdapters, trainer_pb2.ListAdaptersRequest(name="ships"))
    assert [a.version for a in listed.reply.adapters] == [1, 2]
    assert call(clients.encoder.GetEmbedding, encoder_pb2.GetEmbeddingRequest(key=owned.key)).code == Code.OK
    assert owned.job_id in {job.id for job in call(clients.trainer.ListJobs, trainer_pb2.ListJobsRequest()).reply.jobs}


@pytest.mark.parametrize("rpc,request_", [
    ("GetEmbedding", encoder_pb2.GetEmbeddingRequest(key="0" * 64, tenant="acme")),
    ("ListAdapters", trainer_pb2.ListAdaptersRequest(tenant="acme")),
    ("ListJobs", trainer_pb2.ListJobsRequest(tenant="acme")),
    ("WatchJob", trainer_pb2.WatchJobRequest(id="0" * 32, tenant="acme")),
    ("CreateJob", trainer_pb2.CreateJobRequest(tenant="acme", dataset="empty", method="decoder", adapter_name="x")),
])
def test_naming_another_tenant_is_permission_denied(clients, rpc, request_):
    outcome = call(clients.method(rpc), request_, metadata=AS_B)
    assert outcome.code == Code.PERMISSION_DENIED and outcome.details.startswith("tenant:"), outcome
