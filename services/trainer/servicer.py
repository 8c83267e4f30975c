"""The gRPC servicers: decode the request, call one JobManager / registry / upload function, encode the reply.

Errors are raised as ``sam_core.errors`` types; ``services.common``'s interceptor maps them to status codes.
The servicers exist once the model has loaded; until then :func:`services.common.server.serve` answers
UNAVAILABLE.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from services._generated.sam.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.server import GrpcService

from . import convert
from .archive_limits import UploadLimits
from .jobs import JobManager
from .registry import TenantRegistry
from .uploads import receive_dataset

_SERVICES = trainer_pb2.DESCRIPTOR.services_by_name
TRAINER = GrpcService(_SERVICES["TrainerService"].full_name, trainer_pb2_grpc.add_TrainerServiceServicer_to_server)
REGISTRY = GrpcService(_SERVICES["AdapterRegistry"].full_name, trainer_pb2_grpc.add_AdapterRegistryServicer_to_server)


class TrainerService(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, manager: JobManager) -> None:
        self.manager = manager

    def CreateJob(self, request: trainer_pb2.CreateJobRequest, context: grpc.ServicerContext) -> trainer_pb2.Job:
        return convert.job_pb(self.manager.create(convert.job_request(request)))

    def WatchJob(self, request: trainer_pb2.WatchJobRequest,
                 context: grpc.ServicerContext) -> Iterator[trainer_pb2.JobEvent]:
        for event in self.manager.watch(request.tenant, request.id, active=context.is_active):
            yield convert.event_pb(event)

    def CancelJob(self, request: trainer_pb2.CancelJobRequest, context: grpc.ServicerContext) -> trainer_pb2.Job:
        return convert.job_pb(self.manager.cancel(request.tenant, request.id))

    def ListJobs(self, request: trainer_pb2.ListJobsRequest,
                 context: grpc.ServicerContext) -> trainer_pb2.ListJobsResponse:
        return trainer_pb2.ListJobsResponse(jobs=[convert.job_pb(job) for job in self.manager.list(request.tenant)])

    def UploadDataset(self, request_iterator: Iterator[trainer_pb2.DatasetChunk],
                      context: grpc.ServicerContext) -> trainer_pb2.DatasetRef:
        settings = self.manager.settings
        result = receive_dataset(convert.chunks(request_iterator), settings.data_dir,
                                 UploadLimits.from_settings(settings))
        return trainer_pb2.DatasetRef(id=result.id, bytes=result.bytes)


class AdapterRegistryService(trainer_pb2_grpc.AdapterRegistryServicer):
    def __init__(self, registry: TenantRegistry) -> None:
        self.registry = registry

    def ListAdapters(self, request: trainer_pb2.ListAdaptersRequest,
                     context: grpc.ServicerContext) -> trainer_pb2.ListAdaptersResponse:
        versions = self.registry.list(request.tenant, request.name)
        return trainer_pb2.ListAdaptersResponse(adapters=[convert.adapter_pb(v) for v in versions])

    def GetAdapter(self, request: trainer_pb2.GetAdapterRequest,
                   context: grpc.ServicerContext) -> trainer_pb2.Adapter:
        return convert.adapter_pb(self.registry.get(request.tenant, request.ref))

    def Promote(self, request: trainer_pb2.PromoteRequest, context: grpc.ServicerContext) -> trainer_pb2.Adapter:
        return convert.adapter_pb(self.registry.promote(request.tenant, request.name, request.alias, request.version,
                                                        force=request.force))

    def Rollback(self, request: trainer_pb2.RollbackRequest, context: grpc.ServicerContext) -> trainer_pb2.Adapter:
        return convert.adapter_pb(self.registry.rollback(request.tenant, request.name, request.alias))

    def Delete(self, request: trainer_pb2.DeleteRequest, context: grpc.ServicerContext) -> trainer_pb2.DeleteResponse:
        self.registry.delete(request.tenant, request.name, request.version)
        return trainer_pb2.DeleteResponse()
